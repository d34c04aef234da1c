"""The C{dgproxy} command: offline tools (no server code here)."""

from __future__ import annotations

import argparse
import getpass
import re
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


def _admin_request(endpoint: str, method: str, path: str, body: bytes = b""):
    """A SigV4-signed request to the running proxy's admin API."""
    import hashlib
    import json
    import os
    import urllib.error
    import urllib.request
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    akid = os.environ.get("DGP_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("DGP_SECRET_ACCESS_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    url = endpoint.rstrip("/") + path
    headers = {"Content-Type": "application/json",
               "x-amz-content-sha256": hashlib.sha256(body).hexdigest()}
    req = AWSRequest(method=method, url=url, data=body, headers=headers)
    if akid and secret:
        SigV4Auth(Credentials(akid, secret), "s3", "us-east-1").add_auth(req)
    r = urllib.request.Request(url, data=body or None, method=method, headers=dict(req.headers))
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """Bytes per second from C{50M}, C{50MiB/s}, C{512k} or plain bytes (powers of 1024)."""
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 50M or 512k)")
    return float(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")


def _reencrypt(args) -> int:
    import json
    import time
    request = {"buckets": args.buckets}
    if args.max_rate is not None:
        request["max_bytes_per_second"] = args.max_rate
    status, doc = _admin_request(args.endpoint, "POST", "/_/api/admin/jobs/reencrypt",
                                 json.dumps(request).encode())
    if status != 202:
        print(f"refused ({status}): {doc}", file=sys.stderr)
        return 1
    for err in doc.get("errors", []):
        print(f"{err['bucket']}: {err['error']}", file=sys.stderr)
    pending = [s["bucket"] for s in doc.get("started", [])]
    code = 0 if not doc.get("errors") else 1
    while pending:
        time.sleep(args.interval)
        for bucket in list(pending):
            status, st = _admin_request(args.endpoint, "GET",
                                        f"/_/api/admin/jobs/reencrypt?bucket={bucket}")
            done = (st.get("rewritten", 0) + st.get("skipped", 0) + st.get("failed", 0))
            print(f"{bucket}: {st.get('status', status)} {done}/{st.get('total') or '?'} "
                  f"(rewritten {st.get('rewritten', 0)}, failed {st.get('failed', 0)})", flush=True)
            if st.get("status") != "running":
                pending.remove(bucket)
                if st.get("status") != "succeeded":
                    code = 1
                    for err in st.get("errors", [])[:10]:
                        print(f"  {err.get('key')}: {err.get('error')}", file=sys.stderr)
    return code


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
    job = sub.add_parser("reencrypt", help="rewrite buckets under their backend's current key "
                                           "(on a running proxy; writes to them get 503 meanwhile)")
    job.add_argument("buckets", nargs="+")
    job.add_argument("--endpoint", default="http://127.0.0.1:9000",
                     help="the proxy's URL (credentials from DGP_ACCESS_KEY_ID/DGP_SECRET_ACCESS_KEY)")
    job.add_argument("--interval", type=float, default=1.0, help="seconds between progress lines")
    job.add_argument("--max-rate", type=parse_rate, default=None, metavar="RATE",
                     help="hold each job to this many bytes per second, e.g. 50M (default: no limit)")
    job.set_defaults(func=_reencrypt)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
