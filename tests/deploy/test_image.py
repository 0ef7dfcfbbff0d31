"""The container image is real: built from deploy/Dockerfile by deploy/image/build.sh, then each stage run
from it with podman against the test suite's loopback Kafka, Dovecot and SMTP sink, as Kubernetes runs it:
uid 10001, read-only root, writable /tmp and /var/lib/popbridge only.

Marked `container`: skipped where buildah/podman/mmdebstrap are missing, failed under CI. The first build
on a machine makes the Debian base with mmdebstrap and downloads every wheel (minutes); later builds reuse
the cached layers (seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.container import CONFIG_DIR, UID, WRITABLE, Image, build_image
from tests.support.dovecot import DovecotMailboxes
from tests.support.mail import canonical_pop3_form
from tests.support.mail_config import delivery_to, mailbox, write_mail_config
from tests.support.pipeline import sample_message, without_trace_field
from tests.support.smtp import SmtpSink

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.timeout(2400)]

CONFIG = f"{CONFIG_DIR}/popbridge.toml"
SIZE_LIMIT = 200 * 1000 * 1000  # the target for the uncompressed image
# Writes each path and says what happened, one JSON object: how the probe sees the filesystem.
PROBE = """
import json, os, sys
seen = {}
for path in sys.argv[1:]:
    try:
        with open(os.path.join(path, "probe"), "w") as f:
            f.write("x")
        seen[path] = "written"
    except OSError as e:
        seen[path] = os.strerror(e.errno)
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "writes": seen}))
"""


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image()


def test_runs_as_uid_10001_with_only_the_documented_mounts_writable(image: Image) -> None:
    readonly = ["/", "/opt/popbridge", "/etc", "/usr/lib", "/var"]
    result = image.run("-c", PROBE, *readonly, *WRITABLE, entrypoint="python3")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert (seen["uid"], seen["gid"]) == (UID, UID)
    assert seen["writes"] == {**dict.fromkeys(readonly, "Read-only file system"),
                              **dict.fromkeys(WRITABLE, "written")}


def test_help_version_labels_package_list_and_size(image: Image) -> None:
    helped = image.run("--help")
    assert helped.returncode == 0, helped.stderr
    assert all(stage in helped.stdout for stage in ("fetcher", "router", "deliverer"))
    version = image.run("--version")
    assert version.returncode == 0, version.stderr
    inspected = image.inspect()
    config = inspected["Config"]
    assert isinstance(config, dict)
    labels = config["Labels"]
    assert version.stdout.strip() == f"popbridge, version {labels['org.opencontainers.image.version']}"
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["popbridge"]

    listed = image.run(labels["io.popbridge.packages"], entrypoint="cat")
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert packages["aiokafka"] == "0.14.0"
    assert packages["popbridge"] == labels["org.opencontainers.image.version"]
    assert "pip" not in packages

    size = inspected["Size"]
    assert isinstance(size, int)
    print(f"image {image.id[:12]}: {size / 1e6:.0f} MB uncompressed, {len(packages)} Python packages")
    assert size <= SIZE_LIMIT


def test_each_stage_from_the_image_carries_mail_end_to_end(
    image: Image,
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    dovecot: DovecotMailboxes,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    user = dovecot.new_user("alice")
    originals = [sample_message(n, size=n * 30_000, tag="image") for n in range(3)]
    dovecot.deliver_many(user, originals)
    config = write_mail_config(
        tmp_path / "popbridge.toml",
        delivery=delivery_to(smtp_sink.port, helo_name="popbridge.test"),
        mailboxes=[mailbox("alice-box", dovecot.server.host, dovecot.server.pop3_port, user.login)],
    )
    config.chmod(0o644)  # the stages read it as uid 10001
    environ = {
        "POPBRIDGE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "POPBRIDGE_TOPIC_PREFIX": kafka_topic_prefix,
        "POPBRIDGE_GROUP_PREFIX": kafka_topic_prefix + "g",
        "POP3_PASSWORD": user.password,
    }

    for stage in (["topics", "create"], ["fetcher", "--once"], ["router", "--until-idle"],
                  ["deliverer", "--until-idle"]):
        args = stage if stage[0] == "topics" else [*stage, "--config", CONFIG]
        result = image.run(*args, environ=environ, mounts=[(config, CONFIG)])
        assert result.returncode == 0, f"{' '.join(stage)}: {result.stderr[-3000:]}"

    assert dovecot.message_count(user) == 0
    received = sorted(without_trace_field(m.content) for m in smtp_sink.messages)
    assert received == sorted(canonical_pop3_form(o) for o in originals)
    assert {m.rcpt_tos for m in smtp_sink.messages} == {("alice@example.com",)}
