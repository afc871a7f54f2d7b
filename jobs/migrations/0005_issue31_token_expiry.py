# Written by hand for issue 31 (API tokens with an optional expiry); 0006 depends on this exact name.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0004_issue20_search_trials'),
    ]

    operations = [
        migrations.AddField(
            model_name='apitoken',
            name='expires_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
