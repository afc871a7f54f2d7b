from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0002_deployment_revision")]

    operations = [
        migrations.AddField(model_name="dataset", name="heartbeat_at", field=models.DateTimeField(blank=True, null=True)),
        migrations.AddField(model_name="dataset", name="attempts", field=models.IntegerField(default=0)),
    ]
