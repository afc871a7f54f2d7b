from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0007_issue34_hub_pulls")]

    operations = [
        migrations.AddField(model_name="finetunejob", name="phases",
                            field=models.JSONField(blank=True, default=list)),
    ]
