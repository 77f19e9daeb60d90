# All loginconnect binaries in one image; the role is the command:
#   docker run IMAGE ingest | scheduler | correlator | loginconnect <subcommand>
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/ingest target/release/scheduler target/release/correlator \
       target/release/loginconnect target/release/fake-graph /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home loginconnect
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV LOG_FORMAT=json
EXPOSE 8080 9101 9102 9465
CMD ["ingest"]
