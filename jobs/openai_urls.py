"""OpenAI-compatible endpoints, mounted at /v1/ by tunedeck/urls.py."""
from django.urls import path

from . import openai_views

urlpatterns = [
    path("models", openai_views.models, name="openai-models"),
    path("models/<str:name>", openai_views.model_detail, name="openai-model"),
    path("chat/completions", openai_views.chat_completions, name="openai-chat"),
    path("completions", openai_views.completions, name="openai-completions"),
]
