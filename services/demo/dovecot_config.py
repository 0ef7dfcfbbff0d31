"""The configuration of the throwaway Dovecot (services.demo.dovecot): who its processes run as, its free
ports, and the one template it is written from (no system configuration is read).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path
from string import Template

HOST = "127.0.0.1"


# --- Who Dovecot's processes run as -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Accounts:
    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int
    rootless: bool


def accounts() -> Accounts:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        return Accounts(
            internal_user=me, internal_group=group, login_user=me,
            mail_uid=os.geteuid(), mail_gid=os.getegid(), rootless=True,
        )  # fmt: skip
    login_user = "dovenull" if _user_exists("dovenull") else "nobody"
    mail = pwd.getpwnam("nobody")
    return Accounts(
        internal_user="root", internal_group="root", login_user=login_user,
        mail_uid=mail.pw_uid, mail_gid=mail.pw_gid, rootless=False,
    )  # fmt: skip


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# --- The configuration ----------------------------------------------------------------------------

_CONFIG = Template("""\
# Written by popbridge (services/demo/dovecot.py). No system configuration is read.
base_dir = ${root}/run
state_dir = ${root}/state
log_path = ${root}/log/dovecot.log
instance_name = ${instance}
hostname = localhost
protocols = ${protocols}
listen = 127.0.0.1
shutdown_clients = yes

default_internal_user = ${internal_user}
default_internal_group = ${internal_group}
default_login_user = ${login_user}
first_valid_uid = ${mail_uid}
last_valid_uid = ${mail_uid}
first_valid_gid = ${mail_gid}
last_valid_gid = ${mail_gid}
mail_uid = ${mail_uid}
mail_gid = ${mail_gid}
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 100
pop3_uidl_format = %08Xu%08Xv

${ssl_settings}

# APOP needs the plaintext password, hence scheme=PLAIN; plain USER/PASS is allowed without TLS.
disable_plaintext_auth = no
auth_mechanisms = plain login apop
auth_failure_delay = 0
auth_verbose = yes
# One passwd-file per user: Dovecot re-checks a changed passwd-file at most once a second, but opens
# a file it has not seen at the first lookup, so a user added a moment ago can log in at once.
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${users}/%u
}
userdb {
  driver = passwd-file
  args = username_format=%u ${users}/%u
}

service pop3-login {
  ${chroot_setting}
  inet_listener pop3 {
    address = 127.0.0.1
    port = ${pop3_port}
  }
${pop3s_listener}
}
${lmtp_service}
# No growing delay (2 s, 4 s, ... 15 s) after failed logins from 127.0.0.1: tests fail logins on purpose.
service anvil {
  ${chroot_setting}
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
${rootless_services}
""")

_SSL = Template("""\
ssl = yes
ssl_cert = <${cert_file}
ssl_key = <${key_file}""")

_POP3S_LISTENER = Template("""\
  inet_listener pop3s {
    address = 127.0.0.1
    port = ${pop3s_port}
    ssl = yes
  }""")

# LMTP: RCPT TO:<login@any.domain> delivers to `login`.
_LMTP_SERVICE = Template("""\
protocol lmtp {
  auth_username_format = %Ln
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = ${lmtp_port}
  }
}""")

# Without root nothing can chroot or change user (the "Rootless installation" page of the Dovecot wiki).
_ROOTLESS_SERVICES = Template("""\
service auth-worker {
  user = ${internal_user}
}
""")


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The server's certificate chain and key (PEM) for POP3S and STLS."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True, kw_only=True)
class Ports:
    pop3: int
    pop3s: int = 0  # 0: not listening
    lmtp: int = 0


def free_ports(*, tls: bool, lmtp: bool) -> Ports:
    """Distinct free loopback ports for the listeners wanted (held open together so they differ)."""
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for sock in (a, b, c):
            sock.bind((HOST, 0))
        ports = [int(sock.getsockname()[1]) for sock in (a, b, c)]
    return Ports(pop3=ports[0], pop3s=ports[1] if tls else 0, lmtp=ports[2] if lmtp else 0)


@dataclass(frozen=True, kw_only=True)
class Setup:
    root: Path
    instance: str
    accounts: Accounts
    tls: TlsFiles | None
    ports: Ports


def render_config(setup: Setup) -> str:
    accounts, tls, ports = setup.accounts, setup.tls, setup.ports
    rootless = _ROOTLESS_SERVICES.substitute(internal_user=accounts.internal_user)
    ssl = "ssl = no" if tls is None else _SSL.substitute(cert_file=tls.cert_file, key_file=tls.key_file)
    return _CONFIG.substitute(
        root=setup.root, users=setup.root / "users", instance=setup.instance,
        protocols="pop3 lmtp" if ports.lmtp else "pop3",
        ssl_settings=ssl,
        pop3s_listener=_POP3S_LISTENER.substitute(pop3s_port=ports.pop3s) if ports.pop3s else "",
        lmtp_service=_LMTP_SERVICE.substitute(lmtp_port=ports.lmtp) if ports.lmtp else "",
        internal_user=accounts.internal_user, internal_group=accounts.internal_group,
        login_user=accounts.login_user, mail_uid=accounts.mail_uid, mail_gid=accounts.mail_gid,
        chroot_setting="chroot =" if accounts.rootless else "",
        rootless_services=rootless if accounts.rootless else "",
        pop3_port=ports.pop3,
    )  # fmt: skip
