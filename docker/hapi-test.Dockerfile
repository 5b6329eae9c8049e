# The HAPI FHIR R4 test server of hapi-server/ (the end-to-end tests' "EHR") as an image, so
# docker/compose.yaml can run in CI without pulling hapiproject/hapi, which stays the default for
# users. scripts/image builds it; the build context is hapi-server/target (the fat jar only):
#   scripts/fhir-server build
#   docker build -f docker/hapi-test.Dockerfile -t g0129-hapi-test hapi-server/target
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# Debian's Java 17 runtime. Slim images install no manuals, but the JRE's postinst links its man
# pages with update-alternatives, which fails unless the directory is there. bash, which the
# healthchecks (compose's and the one below) use to ask /fhir/metadata over /dev/tcp, is in every
# Debian image.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10002 hapi \
    && useradd --system --uid 10002 --gid 10002 --home-dir /app --no-create-home --shell /usr/sbin/nologin hapi
COPY hapi-test-server.jar /app/hapi-test-server.jar

# application.yaml binds to 127.0.0.1 for the host; in a container it must answer on every address.
ENV SERVER_ADDRESS=0.0.0.0 \
    SERVER_PORT=8080
USER 10002:10002
WORKDIR /app
EXPOSE 8080

# The data is in memory (H2): nothing is written but temporary files.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=10 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /fhir/metadata HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q '^HTTP/1\\.[01] 200'"]

# The options scripts/fhir-server uses: C1 only and the serial GC start faster on 2 cores.
# JAVA_TOOL_OPTIONS (compose sets -Xmx1g) adds to them.
CMD ["java", "-Xmx1g", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-jar", "/app/hapi-test-server.jar"]
