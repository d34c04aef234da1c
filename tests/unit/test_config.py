"""Configuration: what an operator writes (YAML, DGP_* env) and what the service gets.

SPEC §1 and the config fact sheet §1: four optional sections, unknown keys are
errors naming the key and the file, env beats the file, ``${env:…}`` expands,
and every failure is a ConfigError an operator can act on.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy import config
from dgproxy.config import BucketPolicy, ConfigError, expand_env, find_config_file, from_mapping, load

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

SPEC_EXTENSIONS = {".zip", ".tar", ".jar", ".war", ".ear", ".dmg", ".iso", ".sql", ".dump",
                   ".bak", ".backup", ".img", ".qcow2", ".vmdk", ".bin"}


class _FileMixin:
    def write_config(self, text, name="dgproxy.yaml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(path, mode) as f:
            f.write(text)
        return path

    def assertConfigError(self, fn, key=None, source=None) -> ConfigError:
        e = self.assertRaises(ConfigError, fn)
        if key is not None:
            self.assertEqual(e.key, key)
            self.assertIn(key, str(e))
        if source is not None:
            self.assertEqual(e.source, source)
            self.assertIn(source, str(e))
        return e


class DefaultsTests(unittest.TestCase):
    def test_defaults_match_the_spec(self):
        cfg = from_mapping({}, "<defaults>", {})
        self.assertEqual(cfg.listen_addr, "127.0.0.1:9000")
        self.assertEqual(cfg.listen_host_port, ("127.0.0.1", 9000))
        self.assertEqual(cfg.data_dir, "./data")
        self.assertIsNone(cfg.access_key_id)
        self.assertIsNone(cfg.secret_access_key)
        self.assertFalse(cfg.open_access)
        self.assertEqual(cfg.iam_mode, "gui")
        self.assertEqual(cfg.clock_skew_seconds, 300)
        self.assertEqual(cfg.cache_mb, 100)
        self.assertEqual(cfg.codec_concurrency, max(4 * (os.cpu_count() or 1), 4))
        self.assertEqual(cfg.max_multipart_uploads, 1000)
        self.assertEqual(cfg.multipart_idle_ttl_hours, 24)
        self.assertEqual(cfg.audit_ring_size, 500)
        self.assertEqual((cfg.rate_limit_max_attempts, cfg.rate_limit_window_secs,
                          cfg.rate_limit_lockout_secs), (100, 300, 600))
        self.assertIs(cfg.trust_proxy_headers, False)
        self.assertEqual(cfg.session_ttl_hours, 4)
        self.assertEqual(cfg.max_delta_ratio, 0.75)
        self.assertEqual(cfg.max_delta_object_size, 4 * 1024 ** 3)
        self.assertEqual(cfg.log_format, "text")
        self.assertEqual(set(cfg.delta_extensions), SPEC_EXTENSIONS)
        self.assertEqual(dict(cfg.buckets), {})
        self.assertEqual(cfg.virtual_host_domains, ("localhost",))

    def test_unconfigured_bucket_gets_the_default_policy(self):
        cfg = from_mapping({}, "<defaults>", {})
        policy = cfg.bucket_policy("anything")
        self.assertEqual(policy, BucketPolicy())
        self.assertTrue(policy.compression)
        self.assertEqual(policy.public_prefixes, ())


class SectionTests(_FileMixin, unittest.TestCase):
    FULL = """\
admission:
  blocks: []
access:
  iam_mode: declarative
  access_key_id: AKIAFILE
  secret_access_key: file-secret
storage:
  filesystem: /srv/dgproxy
  buckets:
    releases:
      compression: false
      max_delta_ratio: 0.5
      public_prefixes: ["builds/", "docs/"]
      quota_bytes: 1000000
    photos:
      public: true
advanced:
  listen_addr: "0.0.0.0:9100"
  cache_size_mb: 2048
  metadata_cache_mb: 200
  codec_concurrency: 8
  log_level: debug
  log_format: json
  max_delta_ratio: 0.4
  clock_skew_seconds: 60
  delta_extensions: [zip, ".TAR"]
  virtual_host_domains: [s3.Example.com]
"""

    def test_every_section(self):
        path = self.write_config(self.FULL)
        cfg = load(path, env={})
        self.assertEqual(cfg.source, path)
        self.assertEqual(cfg.iam_mode, "declarative")
        self.assertEqual((cfg.access_key_id, cfg.secret_access_key), ("AKIAFILE", "file-secret"))
        self.assertEqual(cfg.data_dir, "/srv/dgproxy")
        self.assertEqual(cfg.listen_host_port, ("0.0.0.0", 9100))
        self.assertEqual(cfg.cache_mb, 2048)
        self.assertEqual(cfg.metadata_cache_mb, 200)
        self.assertEqual(cfg.codec_concurrency, 8)
        self.assertEqual(cfg.log_level, "debug")
        self.assertEqual(cfg.log_format, "json")
        self.assertEqual(cfg.max_delta_ratio, 0.4)
        self.assertEqual(cfg.clock_skew_seconds, 60)
        self.assertEqual(cfg.delta_extensions, (".zip", ".tar"))
        self.assertEqual(cfg.virtual_host_domains, ("s3.example.com",))
        releases = cfg.bucket_policy("releases")
        self.assertFalse(releases.compression)
        self.assertEqual(releases.max_delta_ratio, 0.5)
        self.assertEqual(releases.public_prefixes, ("builds/", "docs/"))
        self.assertEqual(releases.quota_bytes, 1000000)
        self.assertEqual(cfg.bucket_policy("photos").public_prefixes, ("",))

    def test_storage_backend_filesystem_path(self):
        cfg = from_mapping({"storage": {"backend": {"type": "filesystem", "path": "/data/x"}}},
                           "f.yaml", {})
        self.assertEqual(cfg.data_dir, "/data/x")

    def test_empty_file_and_empty_sections_mean_defaults(self):
        for text in ("", "# nothing here\n", "access:\nstorage:\nadvanced:\nadmission:\n"):
            path = self.write_config(text)
            cfg = load(path, env={})
            self.assertEqual(cfg.listen_addr, "127.0.0.1:9000")
            self.assertEqual(cfg.source, path)

    def test_iam_mode_must_be_known(self):
        self.assertConfigError(lambda: from_mapping({"access": {"iam_mode": "ldap"}}, "f", {}),
                               key="access.iam_mode", source="f")

    def test_section_that_is_not_a_mapping(self):
        for doc in ({"advanced": [1, 2]}, {"storage": "fs"}, {"access": 3}):
            self.assertConfigError(lambda: from_mapping(doc, "f.yaml", {}), source="f.yaml")

    def test_top_level_not_a_mapping(self):
        for text in ("- a\n- b\n", "just a string\n", "42\n"):
            path = self.write_config(text)
            self.assertConfigError(lambda: load(path, env={}), source=path)

    def test_log_format_must_be_text_or_json(self):
        self.assertConfigError(lambda: from_mapping({"advanced": {"log_format": "xml"}}, "f", {}))
        self.assertConfigError(lambda: from_mapping({}, "f", {"DGP_LOG_FORMAT": "xml"}))

    def test_delta_extensions_must_be_a_list_of_strings(self):
        for bad in ("zip", [1], [""], {"a": 1}):
            self.assertConfigError(
                lambda: from_mapping({"advanced": {"delta_extensions": bad}}, "f", {}),
                key="advanced.delta_extensions")

    def test_bad_numbers_name_the_key(self):
        self.assertConfigError(
            lambda: from_mapping({"advanced": {"cache_size_mb": "lots"}}, "f.yaml", {}),
            key="advanced.cache_size_mb", source="f.yaml")
        self.assertConfigError(
            lambda: from_mapping({"advanced": {"codec_concurrency": True}}, "f.yaml", {}),
            key="advanced.codec_concurrency")
        self.assertConfigError(lambda: from_mapping({"advanced": {"codec_concurrency": 0}}, "f", {}))
        self.assertConfigError(lambda: from_mapping({"advanced": {"clock_skew_seconds": -5}}, "f", {}))

    def test_infinite_or_huge_numbers_are_config_errors(self):
        # YAML happily produces .inf and 400-digit integers; neither may escape
        # as a raw OverflowError without the key and the file.
        for doc, key in (
                ({"advanced": {"cache_size_mb": float("inf")}}, "advanced.cache_size_mb"),
                ({"advanced": {"max_delta_ratio": 10 ** 400}}, "advanced.max_delta_ratio"),
                ({"storage": {"buckets": {"abc": {"max_delta_ratio": 10 ** 400}}}},
                 "storage.buckets.abc.max_delta_ratio"),
                ({"storage": {"buckets": {"abc": {"quota_bytes": float("-inf")}}}},
                 "storage.buckets.abc.quota_bytes")):
            self.assertConfigError(lambda: from_mapping(doc, "f.yaml", {}), key=key, source="f.yaml")



class UnknownKeyTests(_FileMixin, unittest.TestCase):
    CASES = [
        ("bogus: 1\n", "bogus"),
        ("access:\n  iam_mod: gui\n", "access.iam_mod"),
        ("storage:\n  bukets: {}\n", "storage.bukets"),
        ("storage:\n  buckets:\n    photos:\n      compresion: false\n",
         "storage.buckets.photos.compresion"),
        ("advanced:\n  cache_mb: 5\n", "advanced.cache_mb"),
    ]

    def test_unknown_keys_at_every_level_name_key_and_file(self):
        for text, key in self.CASES:
            path = self.write_config(text)
            self.assertConfigError(lambda: load(path, env={}), key=key, source=path)

    def test_unknown_key_in_storage_backend(self):
        # A typo in the backend block (`pth` for `path`) must not silently fall
        # back to ./data. The Rust proxy has deny_unknown_fields everywhere.
        path = self.write_config("storage:\n  backend:\n    type: filesystem\n    pth: /srv\n")
        self.assertConfigError(lambda: load(path, env={}), key="storage.backend.pth", source=path)

    def test_unknown_key_in_a_named_backend(self):
        path = self.write_config("storage:\n  backends:\n    - name: hot\n      typ: s3\n")
        self.assertConfigError(lambda: load(path, env={}), key="storage.backends[0].typ",
                               source=path)

    def test_s3_companion_fields_without_s3(self):
        # Config fact sheet §1.4: companion fields without `s3:` are an error,
        # not silently ignored.
        path = self.write_config("storage:\n  region: eu-west-1\n")
        self.assertConfigError(lambda: load(path, env={}), source=path)



class BackendTests(unittest.TestCase):
    def test_named_backends(self):
        cfg = from_mapping({"storage": {
            "backends": [{"name": "hot", "type": "filesystem", "path": "/hot"},
                         {"name": "cold", "type": "s3", "endpoint": "https://s3.example.com",
                          "region": "eu-west-3"}],
            "default_backend": "cold",
            "buckets": {"photos": {"backend": "hot"}, "logs": {"backend": "cold",
                                                               "alias": "real-logs"}}}},
            "f.yaml", {})
        self.assertEqual([(b.name, b.type) for b in cfg.backends], [("hot", "filesystem"),
                                                                   ("cold", "s3")])
        self.assertEqual(cfg.default_backend, "cold")
        self.assertEqual(cfg.bucket_policy("logs").alias, "real-logs")

    def test_backend_errors_name_the_key(self):
        cases = [
            ({"backends": [{"name": "a"}, {"name": "a"}]}, "storage.backends"),
            ({"backends": [{"type": "filesystem"}]}, "storage.backends[0].name"),
            ({"backends": [{"name": "a", "type": "ftp"}]}, "storage.backends[0].type"),
            ({"backends": [{"name": "a", "type": "s3", "endpoint": "s3.example.com"}]},
             "storage.backends[0].endpoint"),
            ({"backends": [{"name": "a", "path": "/srv/../etc"}]}, "storage.backends[0].path"),
            ({"backends": [{"name": "a"}], "default_backend": "b"}, "storage.default_backend"),
            ({"backends": "a"}, "storage.backends"),
            ({"buckets": {"photos": {"backend": "nowhere"}}}, "storage.buckets.photos.backend"),
        ]
        for storage, key in cases:
            e = self.assertRaises(ConfigError, from_mapping, {"storage": storage}, "f.yaml", {})
            self.assertEqual((e.key, e.source), (key, "f.yaml"), storage)

    def test_only_one_singleton_form(self):
        for storage in ({"filesystem": "/a", "backend": {"type": "filesystem", "path": "/b"}},
                        {"filesystem": "/a", "s3": "https://s3.example.com"},
                        {"backend": {"type": "filesystem"}, "s3": "https://s3.example.com"}):
            self.assertRaises(ConfigError, from_mapping, {"storage": storage}, "f.yaml", {})


class EnvironmentTests(unittest.TestCase):
    FILE = {
        "access": {"access_key_id": "FILEKEY", "secret_access_key": "file-secret"},
        "storage": {"filesystem": "/from/file"},
        "advanced": {"listen_addr": "0.0.0.0:1111", "cache_size_mb": 5, "log_format": "json",
                     "max_delta_ratio": 0.3, "virtual_host_domains": ["file.example"]},
    }

    def test_env_beats_file(self):
        env = {"DGP_LISTEN_ADDR": "127.0.0.1:2222", "DGP_CACHE_MB": "7",
               "DGP_DATA_DIR": "/from/env", "DGP_LOG_FORMAT": "text",
               "DGP_ACCESS_KEY_ID": "ENVKEY", "DGP_SECRET_ACCESS_KEY": "env-secret",
               "DGP_MAX_DELTA_RATIO": "0.6", "DGP_VIRTUAL_HOST_DOMAINS": "env.example"}
        cfg = from_mapping(self.FILE, "f.yaml", env)
        self.assertEqual(cfg.listen_host_port, ("127.0.0.1", 2222))
        self.assertEqual(cfg.cache_mb, 7)
        self.assertEqual(cfg.data_dir, "/from/env")
        self.assertEqual(cfg.log_format, "text")
        self.assertEqual((cfg.access_key_id, cfg.secret_access_key), ("ENVKEY", "env-secret"))
        self.assertEqual(cfg.max_delta_ratio, 0.6)
        self.assertEqual(cfg.virtual_host_domains, ("env.example",))

    def test_file_applies_without_env(self):
        cfg = from_mapping(self.FILE, "f.yaml", {})
        self.assertEqual(cfg.listen_host_port, ("0.0.0.0", 1111))
        self.assertEqual(cfg.cache_mb, 5)
        self.assertEqual(cfg.data_dir, "/from/file")

    def test_empty_env_var_does_not_override(self):
        cfg = from_mapping(self.FILE, "f.yaml", {"DGP_CACHE_MB": "", "DGP_DATA_DIR": ""})
        self.assertEqual(cfg.cache_mb, 5)
        self.assertEqual(cfg.data_dir, "/from/file")

    def test_each_seed_variable_sets_its_value(self):
        cases = [
            ("DGP_CLOCK_SKEW_SECONDS", "60", "clock_skew_seconds", 60),
            ("DGP_CACHE_MB", "1024", "cache_mb", 1024),
            ("DGP_METADATA_CACHE_MB", "0", "metadata_cache_mb", 0),
            ("DGP_CODEC_CONCURRENCY", "3", "codec_concurrency", 3),
            ("DGP_MAX_MULTIPART_UPLOADS", "10", "max_multipart_uploads", 10),
            ("DGP_MULTIPART_IDLE_TTL_HOURS", "2", "multipart_idle_ttl_hours", 2),
            ("DGP_AUDIT_RING_SIZE", "50", "audit_ring_size", 50),
            ("DGP_RATE_LIMIT_MAX_ATTEMPTS", "5", "rate_limit_max_attempts", 5),
            ("DGP_RATE_LIMIT_WINDOW_SECS", "6", "rate_limit_window_secs", 6),
            ("DGP_RATE_LIMIT_LOCKOUT_SECS", "7", "rate_limit_lockout_secs", 7),
            ("DGP_SESSION_TTL_HOURS", "8", "session_ttl_hours", 8),
            ("DGP_CONFIG_SYNC_BUCKET", "cfg-sync", "config_sync_bucket", "cfg-sync"),
            ("DGP_ENCRYPTION_KEY", "ab" * 32, "encryption_key", "ab" * 32),
            ("DGP_BOOTSTRAP_PASSWORD_HASH", "$2b$12$abc", "bootstrap_password_hash", "$2b$12$abc"),
            ("DGP_MAX_DELTA_RATIO", "0.5", "max_delta_ratio", 0.5),
            ("DGP_LOG_LEVEL", "debug", "log_level", "debug"),
            ("DGP_LOG_FORMAT", "json", "log_format", "json"),
            ("DGP_S3_ENDPOINT", "http://s3.local:8333", "s3_endpoint", "http://s3.local:8333"),
            ("DGP_S3_REGION", "eu-west-3", "s3_region", "eu-west-3"),
            ("DGP_BE_AWS_ACCESS_KEY_ID", "BEKEY", "backend_access_key_id", "BEKEY"),
            ("DGP_BE_AWS_SECRET_ACCESS_KEY", "besecret", "backend_secret_access_key", "besecret"),
            ("DGP_DATA_DIR", "/var/lib/dg", "data_dir", "/var/lib/dg"),
            ("DGP_S3_CONNECT_TIMEOUT_SECS", "3", "s3_connect_timeout_secs", 3),
            ("DGP_S3_READ_TIMEOUT_SECS", "120", "s3_read_timeout_secs", 120),
        ]
        for var, value, fieldname, expected in cases:
            cfg = from_mapping({}, "<defaults>", {var: value})
            self.assertEqual(getattr(cfg, fieldname), expected, var)

    def test_boolean_variable(self):
        for value in ("true", "1", "yes", "on", "TRUE", " On "):
            cfg = from_mapping({}, "x", {"DGP_TRUST_PROXY_HEADERS": value})
            self.assertIs(cfg.trust_proxy_headers, True, value)
        for value in ("false", "0", "no", "off"):
            cfg = from_mapping({}, "x", {"DGP_TRUST_PROXY_HEADERS": value})
            self.assertIs(cfg.trust_proxy_headers, False, value)
        e = self.assertRaises(ConfigError, from_mapping, {}, "x",
                              {"DGP_TRUST_PROXY_HEADERS": "maybe"})
        self.assertEqual(e.key, "DGP_TRUST_PROXY_HEADERS")

    def test_bad_env_values_name_the_variable(self):
        for var, value in (("DGP_CACHE_MB", "lots"), ("DGP_CLOCK_SKEW_SECONDS", "1.5"),
                           ("DGP_MAX_DELTA_RATIO", "half"), ("DGP_CODEC_CONCURRENCY", "0x10")):
            e = self.assertRaises(ConfigError, from_mapping, {}, "x", {var: value})
            self.assertEqual(e.key, var)
            self.assertIn(var, str(e))

    def test_virtual_host_domains_list(self):
        cfg = from_mapping({}, "x", {"DGP_VIRTUAL_HOST_DOMAINS": " s3.Example.com, ,other.ORG,"})
        self.assertEqual(cfg.virtual_host_domains, ("s3.example.com", "other.org"))
        cfg = from_mapping({}, "x", {"DGP_VIRTUAL_HOST_DOMAINS": "single.example"})
        self.assertEqual(cfg.virtual_host_domains, ("single.example",))
        self.assertRaises(ConfigError, from_mapping,
                          {"advanced": {"virtual_host_domains": 5}}, "x", {})
        self.assertRaises(ConfigError, from_mapping,
                          {"advanced": {"virtual_host_domains": [1, 2]}}, "x", {})


class ExpansionTests(_FileMixin, unittest.TestCase):
    def test_env_reference_expands(self):
        path = self.write_config(
            "access:\n  access_key_id: ${env:AK}\n  secret_access_key: \"${env:SK}\"\n")
        cfg = load(path, env={"AK": "AKIAEXPANDED", "SK": "s/e+c=ret"})
        self.assertEqual(cfg.access_key_id, "AKIAEXPANDED")
        self.assertEqual(cfg.secret_access_key, "s/e+c=ret")

    def test_default_used_when_unset(self):
        path = self.write_config("advanced:\n  log_level: ${env:LEVEL:-warn}\n")
        self.assertEqual(load(path, env={}).log_level, "warn")
        self.assertEqual(load(path, env={"LEVEL": "error"}).log_level, "error")

    def test_double_dollar_is_a_literal_dollar(self):
        path = self.write_config("advanced:\n  bootstrap_password_hash: '$$2b$$12$$abc'\n")
        self.assertEqual(load(path, env={}).bootstrap_password_hash, "$2b$12$abc")

    def test_other_placeholders_pass_through(self):
        self.assertEqual(expand_env("${iam:username}/x $HOME", {}, "f"), "${iam:username}/x $HOME")

    def test_expanded_values_are_not_expanded_again(self):
        self.assertEqual(expand_env("${env:A}", {"A": "${env:B}"}, "f"), "${env:B}")
        self.assertEqual(expand_env("${env:A}", {"A": "$$"}, "f"), "$$")

    def test_unset_variable_names_it_and_the_file(self):
        path = self.write_config("access:\n  secret_access_key: ${env:NOT_SET_ANYWHERE}\n")
        e = self.assertConfigError(lambda: load(path, env={}), source=path)
        self.assertIn("NOT_SET_ANYWHERE", str(e))

    def test_control_characters_in_a_value_are_refused(self):
        path = self.write_config("advanced:\n  log_level: ${env:INJECT}\n")
        e = self.assertConfigError(lambda: load(path, env={"INJECT": "info\nadvanced: {}"}),
                                   source=path)
        self.assertIn("INJECT", str(e))


class ValidationTests(unittest.TestCase):
    def test_listen_addr_forms(self):
        for value, expected in (("0.0.0.0:9000", ("0.0.0.0", 9000)),
                                ("127.0.0.1:1", ("127.0.0.1", 1)),
                                ("[::1]:9000", ("::1", 9000)),
                                ("localhost:65535", ("localhost", 65535))):
            cfg = from_mapping({"advanced": {"listen_addr": value}}, "f", {})
            self.assertEqual(cfg.listen_host_port, expected, value)

    def test_bad_listen_addr(self):
        for value in ("localhost", "host:", "host:port", "host:65536", "host:-1", "host:9 0",
                      "1.2.3.4"):
            e = self.assertRaises(ConfigError, from_mapping,
                                  {"advanced": {"listen_addr": value}}, "f.yaml", {})
            self.assertIn(value, str(e))
            self.assertEqual(e.source, "f.yaml")
            e = self.assertRaises(ConfigError, from_mapping, {}, "f.yaml",
                                  {"DGP_LISTEN_ADDR": value})
            self.assertIn("listen_addr", e.key.lower())

    def test_s3_timeouts_default_and_must_be_positive(self):
        cfg = from_mapping({}, "f", {})
        self.assertEqual((cfg.s3_connect_timeout_secs, cfg.s3_read_timeout_secs), (10, 60))
        for var in ("DGP_S3_CONNECT_TIMEOUT_SECS", "DGP_S3_READ_TIMEOUT_SECS"):
            for value in ("0", "-5", "soon", "1.5"):
                e = self.assertRaises(ConfigError, from_mapping, {}, "f", {var: value})
                self.assertIn(var, str(e))

    def test_listen_addr_with_non_ascii_digits(self):
        # str.isdigit() accepts '²', which int() then rejects with a raw ValueError.
        for value in ("host:²", "host:9⁰"):
            self.assertRaises(ConfigError, from_mapping, {}, "f", {"DGP_LISTEN_ADDR": value})


    @SETTINGS
    @given(st.text(max_size=30)
           | st.builds("{}:{}".format, st.text(max_size=8),
                       st.text(alphabet="0123456789²³⁰٣-+ ", max_size=6)))
    @example("host:²")
    def test_any_listen_addr_is_valid_or_a_config_error(self, value):
        try:
            host, port = config.parse_listen_addr(value, "listen_addr", "f")
        except ConfigError:
            return
        self.assertTrue(0 <= port <= 65535)
        self.assertIsInstance(host, str)


    def test_authentication_none_means_open_access(self):
        for doc, env in (({"access": {"authentication": "none"}}, {}),
                         ({}, {"DGP_AUTHENTICATION": "none"}),
                         ({}, {"DGP_AUTHENTICATION": "NONE"})):
            self.assertTrue(from_mapping(doc, "f", env).open_access)

    def test_other_authentication_values_are_refused(self):
        for value in ("sigv4", "off", "false", "null-ish"):
            e = self.assertRaises(ConfigError, from_mapping,
                                  {"access": {"authentication": value}}, "f", {})
            self.assertIn("authentication", e.key)
            self.assertRaises(ConfigError, from_mapping, {}, "f", {"DGP_AUTHENTICATION": value})

    def test_credentials_both_or_neither(self):
        self.assertIsNone(from_mapping({}, "f", {}).access_key_id)
        cfg = from_mapping({"access": {"access_key_id": "A", "secret_access_key": "S"}}, "f", {})
        self.assertEqual((cfg.access_key_id, cfg.secret_access_key), ("A", "S"))
        for access in ({"access_key_id": "A"}, {"secret_access_key": "S"}):
            e = self.assertRaises(ConfigError, from_mapping, {"access": access}, "f.yaml", {})
            self.assertEqual(e.source, "f.yaml")
        for env in ({"DGP_ACCESS_KEY_ID": "A"}, {"DGP_SECRET_ACCESS_KEY": "S"}):
            self.assertRaises(ConfigError, from_mapping, {}, "f.yaml", env)

    def test_credentials_may_come_half_from_file_half_from_env(self):
        cfg = from_mapping({"access": {"access_key_id": "A"}}, "f",
                           {"DGP_SECRET_ACCESS_KEY": "S"})
        self.assertEqual((cfg.access_key_id, cfg.secret_access_key), ("A", "S"))

    def test_global_ratio_bounds(self):
        for ratio in (0.0, 1.0, 0.75):
            self.assertEqual(from_mapping({"advanced": {"max_delta_ratio": ratio}}, "f", {})
                             .max_delta_ratio, ratio)
        for ratio in (-0.1, 1.01, float("nan"), float("inf")):
            self.assertRaises(ConfigError, from_mapping,
                              {"advanced": {"max_delta_ratio": ratio}}, "f", {})
        self.assertRaises(ConfigError, from_mapping, {}, "f", {"DGP_MAX_DELTA_RATIO": "2"})


    def test_metadata_cache_bounds(self):
        """50 MB unless set; 0 turns it off; below 0 is an error naming the key."""
        self.assertEqual(from_mapping({}, "f", {}).metadata_cache_mb, 50)
        self.assertEqual(from_mapping({"advanced": {"metadata_cache_mb": 0}}, "f", {})
                         .metadata_cache_mb, 0)
        e = self.assertRaises(ConfigError, from_mapping, {}, "f", {"DGP_METADATA_CACHE_MB": "-1"})
        self.assertEqual(e.key, "metadata_cache_mb")


class BucketPolicyTests(unittest.TestCase):
    def policy(self, spec, name="photos"):
        return from_mapping({"storage": {"buckets": {name: spec}}}, "f.yaml", {}).bucket_policy(name)

    def bucket_error(self, spec, key, name="photos"):
        e = self.assertRaises(ConfigError, from_mapping,
                              {"storage": {"buckets": {name: spec}}}, "f.yaml", {})
        self.assertEqual(e.key, key)
        self.assertEqual(e.source, "f.yaml")
        return e

    def test_public_prefixes_must_end_with_slash(self):
        self.assertEqual(self.policy({"public_prefixes": ["a/", "a/b/"]}).public_prefixes,
                         ("a/", "a/b/"))
        for bad in (["docs"], ["a/", "b"], ["a/../"], ["a//b/"], ["a\0/"], [3]):
            self.bucket_error({"public_prefixes": bad}, "storage.buckets.photos.public_prefixes")

    def test_empty_prefix_is_the_whole_bucket(self):
        self.assertEqual(self.policy({"public_prefixes": [""]}).public_prefixes, ("",))

    def test_public_true(self):
        self.assertEqual(self.policy({"public": True}).public_prefixes, ("",))
        self.assertEqual(self.policy({"public": False}).public_prefixes, ())

    def test_public_with_prefixes_is_an_error(self):
        self.bucket_error({"public": True, "public_prefixes": ["docs/"]},
                          "storage.buckets.photos.public")

    def test_public_prefixes_must_be_a_list(self):
        self.bucket_error({"public_prefixes": "docs/"}, "storage.buckets.photos.public_prefixes")

    def test_ratio_bounds(self):
        self.assertEqual(self.policy({"max_delta_ratio": 0}).max_delta_ratio, 0.0)
        self.assertEqual(self.policy({"max_delta_ratio": 1}).max_delta_ratio, 1.0)
        self.assertIsNone(self.policy({}).max_delta_ratio)
        for bad in (-0.01, 1.5, "lots", float("nan")):
            self.bucket_error({"max_delta_ratio": bad}, "storage.buckets.photos.max_delta_ratio")

    def test_compression_flag(self):
        self.assertFalse(self.policy({"compression": False}).compression)
        self.assertTrue(self.policy({"compression": True}).compression)
        self.bucket_error({"compression": "sometimes"}, "storage.buckets.photos.compression")

    def test_quota_and_routing(self):
        p = self.policy({"quota_bytes": 0, "backend": "default", "alias": "real-bucket"})
        self.assertEqual((p.quota_bytes, p.backend, p.alias), (0, "default", "real-bucket"))
        self.bucket_error({"quota_bytes": "big"}, "storage.buckets.photos.quota_bytes")

    def test_invalid_bucket_name(self):
        for name in ("Photos_", "a", "-bad-"):
            e = self.assertRaises(ConfigError, from_mapping,
                                  {"storage": {"buckets": {name: {}}}}, "f.yaml", {})
            self.assertIn(name, e.key)

    def test_bucket_spec_must_be_mapping(self):
        self.bucket_error(["compression"], "storage.buckets.photos")


class FileTests(_FileMixin, unittest.TestCase):
    def test_unparseable_file_names_the_file(self):
        for text in ("access: [unclosed\n", "advanced:\n  log_level: a\n    b: c\n:::\n",
                     "\tadvanced: {}\n"):
            path = self.write_config(text)
            e = self.assertConfigError(lambda: load(path, env={}), source=path)
            self.assertIn("parse", e.message)

    def test_yaml_value_that_fails_to_construct_names_the_file(self):
        # PyYAML resolves 2024-13-45 as a timestamp and raises a bare ValueError.
        path = self.write_config("advanced:\n  log_level: 2024-13-45\n")
        self.assertConfigError(lambda: load(path, env={}), source=path)


    def test_file_that_is_not_utf8_names_the_file(self):
        path = self.write_config(b"advanced:\n  log_level: caf\xe9\n")
        self.assertConfigError(lambda: load(path, env={}), source=path)


    def test_explicit_missing_file_is_an_error(self):
        missing = os.path.join(self.mktemp(), "nope.yaml")
        self.assertConfigError(lambda: load(missing, env={}), source=missing)
        self.assertConfigError(lambda: load(None, env={"DGP_CONFIG": missing}), source=missing)


class FindConfigFileTests(_FileMixin, unittest.TestCase):
    def setUp(self):
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.etc = os.path.join(os.path.abspath(self.mktemp()), "etc-dgproxy.yaml")
        os.makedirs(os.path.dirname(self.etc))
        old = os.getcwd()
        os.chdir(self.cwd)
        self.addCleanup(os.chdir, old)
        self.original_search = config.CONFIG_SEARCH
        self.patch(config, "CONFIG_SEARCH", ("./dgproxy.yaml", self.etc))

    def touch(self, path, text="advanced:\n  log_level: marker\n"):
        with open(path, "w") as f:
            f.write(text)

    def test_search_path_is_the_spec_one(self):
        self.assertEqual(self.original_search, ("./dgproxy.yaml", "/etc/dgproxy/dgproxy.yaml"))

    def test_nothing_found(self):
        self.assertIsNone(find_config_file(None, {}))
        self.assertEqual(load(None, env={}).source, "<defaults>")

    def test_etc_is_last(self):
        self.touch(self.etc)
        self.assertEqual(find_config_file(None, {}), self.etc)

    def test_cwd_beats_etc(self):
        self.touch(self.etc)
        self.touch("dgproxy.yaml")
        self.assertEqual(os.path.abspath(find_config_file(None, {})),
                         os.path.join(self.cwd, "dgproxy.yaml"))
        self.assertEqual(load(None, env={}).log_level, "marker")

    def test_env_beats_cwd(self):
        self.touch("dgproxy.yaml")
        other = os.path.join(self.cwd, "other.yaml")
        self.touch(other)
        self.assertEqual(find_config_file(None, {"DGP_CONFIG": other}), other)

    def test_empty_env_is_ignored(self):
        self.touch("dgproxy.yaml")
        self.assertEqual(os.path.basename(find_config_file(None, {"DGP_CONFIG": ""})),
                         "dgproxy.yaml")

    def test_explicit_beats_env(self):
        self.assertEqual(find_config_file("/x/explicit.yaml", {"DGP_CONFIG": "/y/env.yaml"}),
                         "/x/explicit.yaml")


# --- hostile input ------------------------------------------------------------------

_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
            | st.sampled_from(["none", "gui", "0.0.0.0:9000", "docs/", "", "/", "..", "a//b/",
                               "json", "${env:X}", "1e999", "-1", "²", "host:²", 10 ** 400,
                               float("inf"), float("-inf")]))
_KNOWN = sorted(config._SECTIONS | config._ACCESS_KEYS | config._STORAGE_KEYS
                | config._BUCKET_KEYS | set(config._ADVANCED) | config._IGNORED_ADVANCED
                | {"type", "path", "photos", "Bad_Bucket"})
_KEYS = st.sampled_from(_KNOWN) | st.text(max_size=6) | st.integers(-2, 2)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(_KEYS, inner, max_size=3), max_leaves=12)


def _section(keys):
    return st.dictionaries(st.sampled_from(sorted(keys)) | st.text(max_size=4), _VALUES,
                           max_size=4)


_NUMBERS = st.one_of(st.floats(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 400)]),
                     _SCALARS)
_DOCS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "access": _section(config._ACCESS_KEYS),
        "storage": st.fixed_dictionaries({}, optional={
            "buckets": st.dictionaries(
                st.sampled_from(["photos", "abc", "Bad_Bucket", "a"]),
                st.dictionaries(st.sampled_from(sorted(config._BUCKET_KEYS)), _NUMBERS | _VALUES,
                                max_size=4) | _VALUES, max_size=2),
            "backend": st.dictionaries(st.sampled_from(sorted(config._BACKEND_KEYS)), _VALUES)
            | _VALUES,
            "backends": st.lists(st.dictionaries(st.sampled_from(sorted(config._BACKEND_KEYS)),
                                                 _VALUES | st.sampled_from(["hot", "s3"]),
                                                 max_size=4), max_size=3) | _VALUES,
            "default_backend": _VALUES | st.just("hot"),
            "s3": _VALUES | st.just("https://s3.example.com"),
            "filesystem": _VALUES,
        }),
        "advanced": st.dictionaries(st.sampled_from(sorted(config._ADVANCED)) | _KEYS,
                                    _NUMBERS | _VALUES, max_size=5),
        "admission": _VALUES,
    }),
    st.dictionaries(_KEYS, _VALUES, max_size=4),
    _VALUES)
_ENVS = st.dictionaries(
    st.sampled_from(["DGP_LISTEN_ADDR", "DGP_CACHE_MB", "DGP_MAX_DELTA_RATIO"])
    | st.sampled_from(sorted(config._ENV)),
    st.sampled_from(["none", "1", "0", "0.5", "host:²", "1e999", "nan", "-1", "x:1"])
    | st.text(max_size=12), max_size=4)


class HostileConfigTests(_FileMixin, unittest.TestCase):
    @SETTINGS
    @given(_DOCS, _ENVS)
    @example({"advanced": {"cache_size_mb": float("inf")}}, {})
    @example({}, {"DGP_LISTEN_ADDR": "host:²"})
    def test_arbitrary_mappings_raise_only_config_error(self, doc, env):
        try:
            cfg = from_mapping(doc, "hostile.yaml", env)
        except ConfigError as e:
            self.assertTrue(str(e).startswith(("hostile.yaml", "environment")), str(e))
            return
        host, port = cfg.listen_host_port
        self.assertTrue(0 <= port <= 65535)
        self.assertTrue(0.0 <= cfg.max_delta_ratio <= 1.0)


    @SETTINGS
    @given(st.text(alphabet="abcdeks_:-[]{}\"'#&*!|>$ \n\t.0123456789", max_size=80))
    def test_arbitrary_yaml_text_raises_only_config_error(self, text):
        path = getattr(self, "_hostile_path", None)
        if path is None:
            path = self._hostile_path = self.write_config("")
        with open(path, "w") as f:
            f.write(text)
        try:
            load(path, env={})
        except ConfigError as e:
            self.assertEqual(e.source, path)
