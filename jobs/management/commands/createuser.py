from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Creates a user without prompts (or sets the password of an existing one)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--password", required=True)
        parser.add_argument("--admin", action="store_true", help="staff and superuser")

    def handle(self, username, password, admin, **options):
        if not username.strip():
            raise CommandError("The username is empty.")
        User = get_user_model()
        user, created = User.objects.get_or_create(username=username)
        user.set_password(password)
        if admin:
            user.is_staff = user.is_superuser = True
        user.save()
        self.stdout.write(f"{'Created' if created else 'Updated'} user {username}{' (admin)' if admin else ''}.")
