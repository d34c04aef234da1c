"""etc/dgproxy-alerts.yml and etc/prometheus.yml, checked by promtool.

C{promtool check rules}/C{check config} must accept the files as shipped, and
C{promtool test rules} runs alert unit tests written here: each alert fires
on a synthetic unhealthy series (after its C{for:}) and stays silent on a
healthy one. promtool comes from Debian's C{prometheus} package; C{make test}
installs it, so a missing promtool is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import yaml
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ETC = os.path.join(ROOT, "etc")
RULES = os.path.join(ETC, "dgproxy-alerts.yml")
CONFIG = os.path.join(ETC, "prometheus.yml")

ALERTS = {"DGProxyDown", "DGProxyHighErrorRate", "DGProxySlowRequests",
          "DGProxyLowCacheHitRatio", "DGProxyCodecSaturated", "DGProxyAuthFailureSpike"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError(
            "promtool is not installed; `make test` installs it (Debian package 'prometheus'), "
            "or run: apt-get install prometheus")
    return path


def rules_doc() -> dict:
    with open(RULES, encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in rules_doc()["groups"] for r in g["rules"] if "alert" in r}


def _render(template: str, labels: dict) -> str:
    """The annotation as Prometheus renders it, for the C{{{ $labels.x }}} templates used."""
    out = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""),
                 template)
    if "{{" in out:
        raise AssertionError(f"annotation uses a template this test cannot render: {template!r}")
    return out


def expect(alert: str, **labels) -> dict:
    """One expected firing alert: its series labels, the rule's labels, rendered annotations."""
    rule = alert_rules()[alert]
    return {"exp_labels": {**labels, **rule.get("labels", {})},
            "exp_annotations": {k: _render(v, labels)
                                for k, v in rule.get("annotations", {}).items()}}


def series(name: str, values: str, **labels) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def none(alert: str, at: str) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def fires(alert: str, at: str, *expected: dict) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": list(expected)}


J = {"job": "dgproxy"}


def unit_tests() -> list[dict]:
    codec = "deltaglider_codec_semaphore_available"
    auth = "deltaglider_auth_failures_total"
    reqs = "deltaglider_http_requests_total"
    dur = "deltaglider_http_request_duration_seconds_bucket"
    return [
        {   # codec slots: held at 0 for longer than 5m fires; at rest, or a short blip, does not
            "interval": "1m",
            "input_series": [
                series(codec, "5 0x20", instance="busy:9000", **J),
                series(codec, "5x20", instance="idle:9000", **J),
                series(codec, "5 0 0 0 5 0 0 0 5 0 0 0 5x8", instance="blips:9000", **J),
            ],
            "alert_rule_test": [
                none("DGProxyCodecSaturated", "4m"),  # pending: 0 for 3m only
                fires("DGProxyCodecSaturated", "10m",
                      expect("DGProxyCodecSaturated", instance="busy:9000", **J)),
                fires("DGProxyCodecSaturated", "20m",
                      expect("DGProxyCodecSaturated", instance="busy:9000", **J)),
            ],
        },
        {   # auth failures: >1/s per instance, summed over reasons, for 5m
            "interval": "1m",
            "input_series": [
                series(auth, "0+150x30", instance="attacked:9000", reason="invalid_signature",
                       **J),  # 2.5/s
                series(auth, "0x30", instance="attacked:9000", reason="invalid_access_key", **J),
                series(auth, "0+36x30", instance="split:9000", reason="invalid_signature",
                       **J),  # 0.6/s ...
                series(auth, "0+36x30", instance="split:9000", reason="clock_skew",
                       **J),  # ... + 0.6/s
                series(auth, "0+30x30", instance="quiet:9000", reason="invalid_signature",
                       **J),  # 0.5/s
                series(auth, "0+1x30", instance="trickle:9000", reason="missing_header", **J),
            ],
            "alert_rule_test": [
                none("DGProxyAuthFailureSpike", "3m"),  # pending
                fires("DGProxyAuthFailureSpike", "15m",
                      expect("DGProxyAuthFailureSpike", instance="attacked:9000"),
                      expect("DGProxyAuthFailureSpike", instance="split:9000")),
            ],
        },
        {   # a counter reset (restart) is not a spike
            "interval": "1m",
            "input_series": [
                series(auth, "0+10x10 0+10x10", instance="restarted:9000",
                       reason="invalid_signature", **J),
            ],
            "alert_rule_test": [none("DGProxyAuthFailureSpike", "20m")],
        },
        {   # the other alerts, each on one unhealthy and one healthy instance
            "interval": "1m",
            "input_series": [
                series("up", "1 1 0x20", instance="gone:9000", **J),
                series("up", "1x22", instance="fine:9000", **J),
                series(reqs, "0+540x30", instance="bad:9000", method="GET", status="200",
                       operation="get_object", **J),
                series(reqs, "0+60x30", instance="bad:9000", method="GET", status="503",
                       operation="get_object", **J),  # 10% 5xx
                series(reqs, "0+990x30", instance="good:9000", method="GET", status="200",
                       operation="get_object", **J),
                series(reqs, "0+10x30", instance="good:9000", method="GET", status="500",
                       operation="get_object", **J),  # 1% 5xx
                series(reqs, "0+100x30", instance="good:9000", method="GET", status="404",
                       operation="get_object", **J),  # 4xx are not errors of the proxy
                # slow: every request between 2.5 s and 5 s; fast: all under 0.5 s
                series(dur, "0x30", instance="slow:9000", method="GET", operation="get_object",
                       le="0.5", **J),
                series(dur, "0x30", instance="slow:9000", method="GET", operation="get_object",
                       le="2.5", **J),
                series(dur, "0+10x30", instance="slow:9000", method="GET",
                       operation="get_object", le="5.0", **J),
                series(dur, "0+10x30", instance="slow:9000", method="GET",
                       operation="get_object", le="+Inf", **J),
                series(dur, "0+10x30", instance="fast:9000", method="GET",
                       operation="get_object", le="0.5", **J),
                series(dur, "0+10x30", instance="fast:9000", method="GET",
                       operation="get_object", le="2.5", **J),
                series(dur, "0+10x30", instance="fast:9000", method="GET",
                       operation="get_object", le="5.0", **J),
                series(dur, "0+10x30", instance="fast:9000", method="GET",
                       operation="get_object", le="+Inf", **J),
                series("deltaglider_cache_hits_total", "0+10x40", instance="cold:9000", **J),
                series("deltaglider_cache_misses_total", "0+30x40", instance="cold:9000", **J),
                series("deltaglider_cache_hits_total", "0+90x40", instance="warm:9000", **J),
                series("deltaglider_cache_misses_total", "0+10x40", instance="warm:9000", **J),
            ],
            "alert_rule_test": [
                none("DGProxyDown", "3m"),
                fires("DGProxyDown", "6m", expect("DGProxyDown", instance="gone:9000", **J)),
                none("DGProxyHighErrorRate", "4m"),
                fires("DGProxyHighErrorRate", "15m",
                      expect("DGProxyHighErrorRate", instance="bad:9000")),
                none("DGProxySlowRequests", "8m"),
                fires("DGProxySlowRequests", "20m",
                      expect("DGProxySlowRequests", instance="slow:9000")),
                none("DGProxyLowCacheHitRatio", "10m"),
                fires("DGProxyLowCacheHitRatio", "35m",
                      expect("DGProxyLowCacheHitRatio", instance="cold:9000")),
            ],
        },
        {   # a healthy, busy fleet: nothing fires, ever
            "interval": "1m",
            "input_series": [
                series("up", "1x60", instance="a:9000", **J),
                series(codec, "5 4 5 3 5x56", instance="a:9000", **J),
                series(auth, "0+2x60", instance="a:9000", reason="invalid_signature", **J),
                series(reqs, "0+600x60", instance="a:9000", method="PUT", status="200",
                       operation="put_object", **J),
                series(dur, "0+600x60", instance="a:9000", method="PUT", operation="put_object",
                       le="1.0", **J),
                series(dur, "0+600x60", instance="a:9000", method="PUT", operation="put_object",
                       le="+Inf", **J),
                series("deltaglider_cache_hits_total", "0+50x60", instance="a:9000", **J),
                series("deltaglider_cache_misses_total", "0+1x60", instance="a:9000", **J),
            ],
            "alert_rule_test": [none(a, t) for a in sorted(ALERTS) for t in ("10m", "59m")],
        },
        {   # an idle instance (no traffic, 0/0 ratios) fires nothing either
            "interval": "1m",
            "input_series": [
                series("up", "1x60", instance="idle:9000", **J),
                series(codec, "5x60", instance="idle:9000", **J),
                series(reqs, "0x60", instance="idle:9000", method="GET", status="200",
                       operation="get_object", **J),
                series("deltaglider_cache_hits_total", "0x60", instance="idle:9000", **J),
                series("deltaglider_cache_misses_total", "0x60", instance="idle:9000", **J),
            ],
            "alert_rule_test": [none(a, "59m") for a in sorted(ALERTS)],
        },
    ]


class AlertRuleTests(unittest.TestCase):

    def setUp(self):
        self.promtool = promtool()
        self.tmp = tempfile.mkdtemp(prefix="dgp-promtool-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        for path in (RULES, CONFIG):
            shutil.copy(path, self.tmp)

    def run_promtool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.promtool, *args], cwd=self.tmp, capture_output=True,
                              text=True, timeout=60)

    def assertOK(self, proc: subprocess.CompletedProcess) -> None:
        self.assertEqual(proc.returncode, 0,
                         f"{' '.join(proc.args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def write_tests(self, tests: list[dict]) -> str:
        path = os.path.join(self.tmp, "dgproxy-alerts.test.yml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"rule_files": ["dgproxy-alerts.yml"], "evaluation_interval": "1m",
                            "tests": tests}, f, sort_keys=False, allow_unicode=True)
        return path

    def test_check_rules(self):
        proc = self.run_promtool("check", "rules", RULES)
        self.assertOK(proc)
        self.assertIn(f"{len(ALERTS)} rules found", proc.stdout)

    def test_check_config(self):
        """The scrape config, with the rules file it names beside it."""
        proc = self.run_promtool("check", "config", "prometheus.yml")
        self.assertOK(proc)
        self.assertIn("1 rule files found", proc.stdout)

    def test_scrape_config_targets_the_metrics_endpoint(self):
        with open(CONFIG, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        self.assertIn("dgproxy-alerts.yml", doc["rule_files"])
        jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
        self.assertIn("dgproxy", jobs, "DGProxyDown selects up{job=\"dgproxy\"}")
        self.assertEqual(jobs["dgproxy"]["metrics_path"], "/_/metrics")

    def test_every_alert_is_documented_and_labelled(self):
        rules = alert_rules()
        self.assertEqual(set(rules), ALERTS)
        for name, rule in rules.items():
            self.assertIn(rule["labels"]["severity"], ("warning", "critical"), name)
            self.assertTrue(rule["annotations"].get("summary"), name)
            self.assertTrue(rule["annotations"].get("description"), name)
            self.assertIn("for", rule, name)

    def test_rules_only_use_metrics_dgproxy_exposes(self):
        exposed = exposed_metric_names()
        for name, rule in alert_rules().items():
            for metric in re.findall(r"\b(deltaglider_\w+|process_\w+)", rule["expr"]):
                base = re.sub(r"_(bucket|count|sum)$", "", metric)
                self.assertTrue(metric in exposed or base in exposed,
                                f"{name} uses {metric}, which /_/metrics does not expose")

    def test_alerts_fire_on_unhealthy_series_and_not_on_healthy_ones(self):
        path = self.write_tests(unit_tests())
        self.assertOK(self.run_promtool("test", "rules", path))

    def test_a_wrong_expectation_is_caught(self):
        """The unit tests above are not vacuous: expecting the idle instance to be
        saturated makes promtool fail."""
        tests = [{
            "interval": "1m",
            "input_series": [series("deltaglider_codec_semaphore_available", "5x20",
                                    instance="idle:9000", **J)],
            "alert_rule_test": [fires("DGProxyCodecSaturated", "10m",
                                      expect("DGProxyCodecSaturated", instance="idle:9000",
                                             **J))],
        }]
        proc = self.run_promtool("test", "rules", self.write_tests(tests))
        self.assertNotEqual(proc.returncode, 0, proc.stdout)


class _Cache:
    size, capacity = 0, 100

    class stats:
        hits = misses = 0
        miss_rate = 0.0

    def __len__(self):
        return 0


class _Codec:
    available = 4


class _Multipart:
    @staticmethod
    def open_uploads():
        return 0


def exposed_metric_names() -> set[str]:
    """Sample names a dgproxy registry exposes (built here, without a server)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dgproxy.observability.metrics import Metrics
    from dgproxy.storage.metacache import MetadataCache

    m = Metrics("filesystem")
    m.watch(_Cache(), _Codec(), _Multipart(), MetadataCache())
    m.request_done("GET", 200, "get_object", 0.01, 0, 10)
    m.auth_failed("invalid_signature")
    names = set()
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names
