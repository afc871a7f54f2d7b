import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0008_issue37_job_phases")]

    operations = [
        migrations.CreateModel(
            name="JobNode",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("node_rank", models.PositiveIntegerField()),
                ("worker", models.CharField(blank=True, max_length=255)),
                ("ranks", models.JSONField(default=list)),
                ("rendezvous", models.CharField(max_length=255)),
                ("status", models.CharField(default="waiting", max_length=16)),
                ("error", models.TextField(blank=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("job", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="nodes",
                                          to="jobs.finetunejob")),
            ],
            options={"ordering": ["node_rank"]},
        ),
        migrations.AddConstraint(
            model_name="jobnode",
            constraint=models.UniqueConstraint(fields=("job", "node_rank"), name="one_row_per_job_node"),
        ),
    ]
