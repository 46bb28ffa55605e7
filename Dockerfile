# The image deploy/kubernetes runs: `turnstile` on a distroless base, as the non-root user
# 65532 the manifests expect. Build it from the repository's root:
#   docker build -t registry.example.com/turnstile:0.1.0 .
# (No Docker engine runs on the project's CI machines; the tests run the same binary with the
# entrypoint, arguments and environment the manifests give: tests/deploy.rs.)
#
# checkov:skip=CKV_DOCKER_2: No HEALTHCHECK - the distroless image has no client to run one, and Kubernetes ignores it: the StatefulSet's probes call /healthz and /readyz

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p turnstile --bin turnstile \
 && install -d -o 65532 -g 65532 /out/var/lib/turnstile \
 && install -m 0755 target/release/turnstile /out/turnstile

# glibc and libgcc (mimalloc, ring), CA certificates for the gateway's HTTPS, nothing else: no
# shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/turnstile /usr/local/bin/turnstile
COPY --from=build --chown=65532:65532 /out/var/lib/turnstile /var/lib/turnstile
USER 65532:65532
# Reachable from outside the container; the journal in its volume (the manifests set both too).
ENV TURNSTILE_LISTEN=0.0.0.0:8080 \
    TURNSTILE_DATA_DIR=/var/lib/turnstile
VOLUME ["/var/lib/turnstile"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/turnstile"]
CMD ["serve"]
