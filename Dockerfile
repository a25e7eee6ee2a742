# Tollgate container image.
#
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 --stop-timeout 20 tollgate
#
# The image runs config/docker.toml (listeners on 0.0.0.0) as /etc/tollgate/tollgate.toml, with
# the rule packs in /etc/lua-free-rules/ so that its `include = ["../lua-free-rules/..."]`
# resolves. See docs/deployment.md.

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build

# Pingora's zlib-ng build needs cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tollgate \
    && install -m 0755 target/release/tollgate /usr/local/bin/tollgate

# --- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid tollgate --home-dir /var/lib/tollgate \
        --no-create-home --shell /usr/sbin/nologin tollgate \
    && install -d -o tollgate -g tollgate -m 0750 /var/lib/tollgate

COPY --from=build /usr/local/bin/tollgate /usr/local/bin/tollgate
COPY config/docker.toml /etc/tollgate/tollgate.toml
COPY lua-free-rules/ /etc/lua-free-rules/

USER 10001:10001
# The gateway's state, and the only place outside /tmp its user may write: the embedded store
# (config/docker.toml puts it here) and, beside it by default, the audit log. A mounted config
# must keep them here too.
WORKDIR /var/lib/tollgate
VOLUME ["/var/lib/tollgate"]

# 8080: the proxy. 9090: the admin listener (/healthz, /readyz); publish it privately.
EXPOSE 8080 9090

# SIGTERM drains for shutdown_grace + shutdown_timeout (15 s in config/docker.toml): give
# `docker stop` / Kubernetes more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tollgate", "run", "-c", "/etc/tollgate/tollgate.toml"]
