"""Tunedeck's training engine: dataset formats, tokenisation, training, evaluation, merge and generation.

Pure Python with no Django. Modules that need torch import it themselves, so the web process can import
`finetune.data` without pulling torch in.
"""
