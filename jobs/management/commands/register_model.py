from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from ...services import InputError, register_base_model


class Command(BaseCommand):
    help = ("Registers a Hugging Face model folder inside TUNEDECK_MODEL_ROOTS (never inside the data directory), "
            "shared with every user unless --owner is given.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("path")
        parser.add_argument("--owner", help="username; without it the model is shared")
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="allow this one model's custom code (admins only; runs code from the folder)")

    def handle(self, name, path, owner, trust_remote_code, **options):
        user = None
        if owner:
            user = get_user_model().objects.filter(username=owner).first()
            if user is None:
                raise CommandError(f"No user {owner!r}.")
        try:
            model = register_base_model(None, name, path, owner=user, trust_remote_code=trust_remote_code)
        except InputError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Registered {model.name} ({model.architecture}, {model.parameters:,} parameters).")
