# Written by hand for issue 31: deleting an adapter version keeps its stopped or failed deployments (their name,
# history and details) with version set to None instead of deleting them. Live ones still block the delete.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0005_issue31_token_expiry'),
    ]

    operations = [
        migrations.AlterField(
            model_name='deployment',
            name='version',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT,
                                    related_name='deployments', to='jobs.adapterversion'),
        ),
    ]
