# The OpenAI Images API front (python -m flux2_serving.front): CPU only, no Triton, no torch. It
# scales apart from the GPU replicas (deploy/kubernetes/front-deployment.yaml).
#   docker build -f docker/front.Dockerfile -t flux2-klein-kv-front:26.07 .
# Not built on the development machines (no Docker engine there): written to Docker's documented
# syntax; tests/test_deploy.py checks that the context lets in what it copies.
FROM python:3.11-slim

COPY docker/requirements-front.txt /opt/flux2/requirements-front.txt
RUN python3 -m pip install --no-cache-dir -r /opt/flux2/requirements-front.txt

COPY pyproject.toml README.md /opt/flux2/src/
COPY flux2_serving /opt/flux2/src/flux2_serving
COPY export /opt/flux2/src/export
COPY clients /opt/flux2/src/clients
RUN python3 -m pip install --no-cache-dir --no-deps /opt/flux2/src

# Not root: the front needs no privilege.
RUN useradd --system --uid 10001 front
USER 10001

EXPOSE 9000

# Keys from the mounted Secret's file (front-api-keys-secret.yaml); Triton's gRPC from the argument.
ENTRYPOINT ["python3", "-m", "flux2_serving.front", "--host", "0.0.0.0", "--port", "9000"]
CMD ["--triton-grpc", "flux2-triton:8001"]
