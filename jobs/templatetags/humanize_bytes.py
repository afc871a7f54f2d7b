from django import template

from finetune.units import format_bytes

register = template.Library()


@register.filter(name="bytes")
def human_bytes(value):
    return format_bytes(value, missing="–")
