# Canvas Token Broker: a small, non-root image serving `broker serve`.
# Build: docker build -t canvas-token-broker .
# Schema migrations run separately (`broker init --no-admin-key`), once per release.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY broker ./broker
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/broker --create-home broker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER broker
WORKDIR /var/lib/broker
ENV BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["broker"]
CMD ["serve"]
