"""The C{dgproxy} command: offline tools (no server code here)."""

from __future__ import annotations

import argparse
import getpass
import sys

from dgproxy import __version__


def _lint(args) -> int:
    from dgproxy.config import ConfigError, load
    import os
    if not os.path.isfile(args.file):
        print(f"{args.file}: cannot read file", file=sys.stderr)
        return 3
    try:
        load(args.file)
    except ConfigError as e:
        print(f"{args.file}: error: {e.key}: {e.message}", file=sys.stderr)
        return 4
    print(f"{args.file}: ok")
    return 0


def _hash_password(args) -> int:
    import bcrypt
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("Passwords differ.", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("Empty password.", file=sys.stderr)
        return 1
    print(bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dgproxy", description="dgproxy offline tools")
    parser.add_argument("--version", action="version", version=f"dgproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    lint = config_sub.add_parser("lint", help="validate a config file (exit 0 ok, 3 unreadable, 4 invalid)")
    lint.add_argument("file")
    lint.set_defaults(func=_lint)
    hp = sub.add_parser("hash-password", help="print a bcrypt hash for DGP_BOOTSTRAP_PASSWORD_HASH")
    hp.set_defaults(func=_hash_password)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
