# s2s-authz container image: a release build on Debian bookworm, run from distroless as uid 65532 (nonroot).
#   docker build -t s2s-authz .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v "$PWD/my-config.yaml:/etc/s2s-authz/s2s-authz.yaml:ro" s2s-authz
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin s2s-authz \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/s2s-authz /usr/local/bin/s2s-authz
# The registry store (SQLite) needs a writable directory; mount a volume here to keep it.
COPY --from=build --chown=65532:65532 /out/data /var/lib/s2s-authz
USER 65532:65532
# Decision port and metrics (/metrics, /healthz, /readyz). The admin port, 50052, listens on loopback only.
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/s2s-authz"]
CMD ["serve", "--config", "/etc/s2s-authz/s2s-authz.yaml", \
     "--grpc-addr", "0.0.0.0:50051", "--metrics-addr", "0.0.0.0:9464", \
     "--data-dir", "/var/lib/s2s-authz"]
