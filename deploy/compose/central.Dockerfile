# tillsync-central for deploy/compose.yaml. Build context: the repository root.
FROM python:3.11-slim
COPY protocol /src/protocol
COPY services /src/services
RUN python -m venv /opt/tillsync \
    && /opt/tillsync/bin/pip install --no-cache-dir /src/protocol /src/services \
    && rm -rf /src
USER 10001:10001
ENTRYPOINT ["/opt/tillsync/bin/tillsync-central"]
CMD ["run"]
