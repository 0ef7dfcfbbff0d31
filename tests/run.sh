#!/usr/bin/env bash
# Runs popbridge's test suite on a fresh Debian machine: installs what the tests need (Dovecot from
# Debian, the project into .venv, the Kafka jars from Maven Central, kustomize from the Go proxy, promtool
# and prometheus from Debian),
# then lint, types and pytest. Arguments go to pytest (default: every test not marked slow).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

if ! command -v dovecot >/dev/null 2>&1 || [ ! -e /usr/lib/dovecot/lmtp ]; then
    step "installing Dovecot (POP3 + LMTP) from Debian"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dovecot-pop3d dovecot-lmtpd
fi

if [ ! -e /usr/lib/dovecot/submission ]; then
    # The OAuth2 tests (tests/integration/test_oauth2_cloud_mailbox.py) check XOAUTH2 on SMTP too.
    step "installing Dovecot's SMTP submission service from Debian"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dovecot-submissiond
fi

if ! command -v postfix >/dev/null 2>&1 || ! command -v postqueue >/dev/null 2>&1; then
    # The relay test (tests/integration/test_postfix_relay.py) starts its own Postfix from a config
    # directory under tmp. The package must neither configure nor start the system one: debconf gets
    # "No configuration" (no /etc/postfix/main.cf is written), and a policy-rc.d denies every service start
    # while the package installs (an existing one, as in Docker images, is kept).
    step "installing Postfix from Debian (unconfigured, never started as a system service)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postfix
    if [ -n "$own_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

if ! command -v buildah >/dev/null 2>&1 || ! command -v podman >/dev/null 2>&1 \
        || ! command -v mmdebstrap >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    # The container test (tests/deploy/test_image.py) builds the image with deploy/image/build.sh and runs
    # it with podman. ~1.5 min to install; the first image build on a machine then takes ~8 min, later
    # ones reuse the cached base and layers.
    step "installing buildah, podman, mmdebstrap and runc from Debian (container image test)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
        buildah podman mmdebstrap runc uidmap
fi

step "installing popbridge into .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

step "fetching the Kafka broker jars (cached after the first run)"
.venv/bin/python deploy/local/kafka_broker.py fetch

step "installing kustomize for the manifest tests (cached after the first run)"
POPBRIDGE_KUSTOMIZE="$(bash deploy/tools/install_kustomize.sh)"
export POPBRIDGE_KUSTOMIZE

step "installing promtool and prometheus for the alert and dashboard tests (Debian package, service not started)"
POPBRIDGE_PROMETHEUS_DIR="$(bash deploy/tools/install_prometheus.sh)"
export POPBRIDGE_PROMETHEUS_DIR

step "ruff"
.venv/bin/ruff check schemas services tests bench deploy
step "mypy --strict"
.venv/bin/mypy --strict schemas services tests

run_pytest() {
    set +e
    .venv/bin/python -m pytest -p no:cacheprovider "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure here, not a pass" >&2
        return 1
    fi
    return "$rc"
}

if [ "$#" -gt 0 ]; then
    step "pytest $*"
    run_pytest "$@"
    exit $?
fi

# No arguments (CI): the default run, then the container image test in its own phase. The image build is
# minutes of work on a machine that has not built it yet, so it is kept out of the default run's budget
# but still runs here: it is the only proof the image works.
# The default run is spread over pytest-xdist workers (POPBRIDGE_TEST_WORKERS, default 2; 0 runs it
# serially in one process): its integration tests mostly wait on brokers and servers, and each worker
# starts its own session parts (broker, Dovecot, own_broker). --dist loadfile gives each module whole to
# one worker, so tests that must not overlap stay in one module (not loadgroup: pytest-xdist 3.8's
# xdist_group marks are silently ignored under pytest 9.2, whose node ids it can no longer rewrite).
workers="${POPBRIDGE_TEST_WORKERS:-2}"
step "pytest (default run: not slow, not container; $workers workers)"
rc=0
run_pytest -n "$workers" --dist loadfile -m "not slow and not container" || rc=$?
step "pytest -m container (builds the image with deploy/image/build.sh, runs every stage from it)"
run_pytest -m "container and not slow" || rc=$?
exit "$rc"
