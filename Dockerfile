# Canvas Token Broker: a small, non-root image serving `broker serve`.
# Build: docker build -t canvas-token-broker .
# Schema migrations run separately (`broker init --no-admin-key`), once per release.
# Every installed package comes from requirements.txt, pinned and hash-checked (`./dev lock`
# writes it); the project's wheel goes in after it without resolving anything. The build
# stage's backend (hatchling) is not locked: it only packs the wheel and stays out of the image.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY broker ./broker
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/broker --create-home broker
# The lock before the wheel, so a code change reuses the dependency layer.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels \
    && pip check
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
