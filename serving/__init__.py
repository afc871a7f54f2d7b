"""Serving engines behind one interface (serving.engine): the built-in engine, vLLM, and GGUF export."""
