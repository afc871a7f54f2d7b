"""python manage.py serve_inference --port 8100: the long-lived process that serves deployed models."""
import logging
import signal
import threading

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Serves live deployments: keeps their models loaded (multi-LoRA on shared bases) and answers the "
        "internal generation API that the web process's OpenAI-compatible endpoints proxy to."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: internal only)")
        parser.add_argument("--port", type=int, default=8100)
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
        parser.add_argument("--max-adapters", type=int, default=8, help="adapters kept loaded per base model")
        parser.add_argument("--poll", type=float, default=1.0, help="seconds between deployment checks")
        parser.add_argument("--no-vllm", action="store_true",
                            help="serve everything with the built-in server, even where vLLM is installed")

    def handle(self, host, port, device, max_adapters, poll, no_vllm=False, **options):
        from jobs.inference_server import InferenceService, make_server

        logging.getLogger("tunedeck.inference").setLevel(logging.INFO)
        # Imported now, not on the first deployment: its load (and its `live`) then takes seconds, not tens.
        import peft  # noqa: F401
        import transformers  # noqa: F401
        service = InferenceService(device=device, max_adapters=max_adapters, poll_seconds=poll,
                                   switched_off={"vllm"} if no_vllm else ())
        httpd = make_server(service, host, port)
        service.start()

        def shut_down(signum, frame):
            service.stop()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, shut_down)
        signal.signal(signal.SIGINT, shut_down)
        self.stdout.write(f"Inference server listening on http://{host}:{httpd.server_address[1]}/", ending="\n")
        self.stdout.flush()
        try:
            httpd.serve_forever(poll_interval=0.5)
        finally:
            service.stop()
            httpd.server_close()
