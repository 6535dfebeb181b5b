"""A node's configuration: resolved once, arguments over environment over defaults, one-line errors.

Scenarios: the strategy's call with nothing given gives the documented
defaults; every README variable reaches ``NodeConfig``; a bad value of each
kind names its variable (or argument) and quotes the value; and the one
``HOST:PORT`` parser agrees with itself everywhere.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import fields
from pathlib import Path

import pytest

from chaos_lightning.config import ConfigError, NodeConfig, parse_membership_overrides, resolve_flags, secret_from_env
from chaos_lightning.membership.config import PRESETS, Config
from chaos_lightning.replication.neighbors import DEFAULT_MAX_SOURCES
from chaos_lightning.wire.addr import AddressError, format_hostport, parse_hostport, parse_hostport_list
from chaos_lightning.wire.auth import encrypts, load_secret

README = Path(__file__).resolve().parents[1] / "README.md"

#: the strategy's keywords, as ChaosStrategy passes them when the user gives none
STRATEGY_NONE = dict(
    backend=None, bind=None, peers=None, secret=None, membership=None, min_nodes=None, global_batch_size=None,
    max_sources=None, join_timeout=None, collective_timeout=None, switch_timeout=None, sideline_timeout=None,
)


def test_nothing_given_nothing_set_gives_the_documented_defaults() -> None:
    cfg = NodeConfig.resolve(env={}, **STRATEGY_NONE)
    assert cfg == NodeConfig()
    assert (cfg.backend, cfg.bind, cfg.peers, cfg.secret) == ("peer", "127.0.0.1:0", (), None)
    assert cfg.membership == PRESETS["local"]
    assert (cfg.min_nodes, cfg.global_batch_size, cfg.max_sources) == (1, None, DEFAULT_MAX_SOURCES)
    assert (cfg.join_timeout, cfg.leave_timeout, cfg.collective_timeout) == (120.0, 15.0, 30.0)
    assert (cfg.switch_timeout, cfg.sideline_timeout, cfg.trace) == (5.0, 600.0, None)
    assert (cfg.etcd_endpoints, cfg.etcd_prefix, cfg.etcd_ttl, cfg.etcd_op_timeout) == ("127.0.0.1:2379", "/chaos", 2.0, 5.0)


def test_an_argument_wins_over_the_environment_which_wins_over_the_default() -> None:
    env = {"CHAOS_MIN_NODES": "3", "CHAOS_BIND": "10.0.0.1:7000", "CHAOS_PEERS": "10.0.0.2:7000", "CHAOS_SECRET": "env-secret-0123456789"}
    from_env = NodeConfig.resolve(env=env)
    assert (from_env.min_nodes, from_env.bind, from_env.peers) == (3, "10.0.0.1:7000", ("10.0.0.2:7000",))
    assert from_env.secret == b"env-secret-0123456789"
    given = NodeConfig.resolve(env=env, min_nodes=2, bind="127.0.0.1:0", peers=["127.0.0.1:1", " 127.0.0.1:2 "], secret="arg-secret-0123456789")
    assert (given.min_nodes, given.bind, given.peers, given.secret) == (2, "127.0.0.1:0", ("127.0.0.1:1", "127.0.0.1:2"), b"arg-secret-0123456789")
    # None means "not given", and an empty variable means "unset"
    assert NodeConfig.resolve(env={**env, "CHAOS_MIN_NODES": ""}, min_nodes=None).min_nodes == 1


def test_the_join_timeout_variable_reaches_the_trainer_configuration() -> None:
    # the Trainer ignored CHAOS_JOIN_TIMEOUT before; now the strategy's call honours it
    assert NodeConfig.resolve(env={"CHAOS_JOIN_TIMEOUT": "7.5"}, **STRATEGY_NONE).join_timeout == 7.5
    assert NodeConfig.resolve(env={"CHAOS_JOIN_TIMEOUT": "7.5"}, **{**STRATEGY_NONE, "join_timeout": 3}).join_timeout == 3.0


def test_membership_from_a_config_a_preset_name_or_the_environment() -> None:
    custom = Config.preset("lan", probe_interval=0.3)
    env = {"CHAOS_PRESET": "edge", "CHAOS_MEMBERSHIP": "probe_interval=2"}
    # a Config object travels as it is: neither variable applies
    assert NodeConfig.resolve(env=env, membership=custom).membership is custom
    assert NodeConfig.resolve(env=env, membership="lan").membership == PRESETS["lan"]
    assert NodeConfig.resolve(env=env).membership == Config.preset("edge", probe_interval=2.0)
    both = NodeConfig.resolve(env={"CHAOS_MEMBERSHIP": "suspicion_mult=3; link_confirm=4 ,auto_rejoin=off"}).membership
    assert both == Config.preset("local", suspicion_mult=3.0, link_confirm=4, auto_rejoin=False)
    assert parse_membership_overrides("indirect_probes=5") == {"indirect_probes": 5}


def test_a_backend_is_an_installed_entry_point() -> None:
    assert NodeConfig.resolve(env={"CHAOS_BACKEND": "etcd"}).backend == "etcd"


@pytest.mark.parametrize("env, message", [
    ({"CHAOS_MIN_NODES": "abc"}, "chaos: CHAOS_MIN_NODES must be an integer >= 1, got 'abc'"),
    ({"CHAOS_MIN_NODES": "0"}, "chaos: CHAOS_MIN_NODES must be an integer >= 1, got '0'"),
    ({"CHAOS_MIN_NODES": "1e99"}, "chaos: CHAOS_MIN_NODES must be an integer >= 1, got '1e99'"),
    ({"CHAOS_GLOBAL_BATCH_SIZE": "-4"}, "chaos: CHAOS_GLOBAL_BATCH_SIZE must be an integer >= 1, got '-4'"),
    ({"CHAOS_TARGET_NODES": "0"}, "chaos: CHAOS_TARGET_NODES must be an integer >= 1, got '0'"),
    ({"CHAOS_MIN_NODES": "3", "CHAOS_TARGET_NODES": "2"},
     "chaos: CHAOS_TARGET_NODES must be >= min_nodes (3): no more would ever be admitted, got 2"),
    ({"CHAOS_TARGET_NODES": "3", "CHAOS_MAX_NODES": "2"},
     "chaos: CHAOS_MAX_NODES must be >= min_nodes and target_nodes (3), got 2"),
    ({"CHAOS_STANDBY": "maybe"}, "chaos: CHAOS_STANDBY must be 1 or 0 (true or false), got 'maybe'"),
    ({"CHAOS_SHARES": "fair"}, "chaos: CHAOS_SHARES must be one of equal, adaptive, got 'fair'"),
    ({"CHAOS_STRAGGLER": "-0.1"}, "chaos: CHAOS_STRAGGLER must be a fraction >= 0 (0: off), got '-0.1'"),
    ({"CHAOS_STRAGGLER": "fast"}, "chaos: CHAOS_STRAGGLER must be a fraction >= 0 (0: off), got 'fast'"),
    ({"CHAOS_METRICS": "9400"}, "chaos: CHAOS_METRICS must be HOST:PORT, got '9400'"),
    ({"CHAOS_MAX_SOURCES": "many"}, "chaos: CHAOS_MAX_SOURCES must be an integer >= 1, got 'many'"),
    ({"CHAOS_BIND": "127.0.0.1:99999"}, "chaos: CHAOS_BIND port must be 0-65535, got '127.0.0.1:99999'"),
    ({"CHAOS_BIND": "127.0.0.1"}, "chaos: CHAOS_BIND must be HOST:PORT, got '127.0.0.1'"),
    ({"CHAOS_BIND": "127.0.0.1:http"}, "chaos: CHAOS_BIND port 'http' is not a number, got '127.0.0.1:http'"),
    ({"CHAOS_BIND": "::1:80"}, "chaos: CHAOS_BIND must bracket an IPv6 address: [ADDR]:PORT, got '::1:80'"),
    ({"CHAOS_PEERS": "127.0.0.1:7000,127.0.0.1:0"}, "chaos: CHAOS_PEERS port must be 1-65535, got '127.0.0.1:0'"),
    ({"CHAOS_PEERS": "bad host:1"},
     "chaos: CHAOS_PEERS host 'bad host' is neither an IP address nor a host name, got 'bad host:1'"),
    ({"CHAOS_PRESET": "fast"}, "chaos: CHAOS_PRESET must be a membership preset (local, lan, edge), got 'fast'"),
    ({"CHAOS_MEMBERSHIP": "probe_interval"},
     "chaos: CHAOS_MEMBERSHIP must be FIELD=VALUE[,FIELD=VALUE...], got 'probe_interval'"),
    ({"CHAOS_MEMBERSHIP": "probe_interval=soon"}, "chaos: CHAOS_MEMBERSHIP probe_interval must be a number > 0, got 'soon'"),
    ({"CHAOS_MEMBERSHIP": "indirect_probes=1.5"},
     "chaos: CHAOS_MEMBERSHIP indirect_probes must be an integer > 0, got '1.5'"),
    ({"CHAOS_MEMBERSHIP": "auto_rejoin=maybe"}, "chaos: CHAOS_MEMBERSHIP auto_rejoin must be true or false, got 'maybe'"),
    ({"CHAOS_MEMBERSHIP": "probe_interval=-1"}, "chaos: CHAOS_MEMBERSHIP probe_interval must be > 0, got '-1'"),
    ({"CHAOS_MEMBERSHIP": "probe_interval=0"}, "chaos: CHAOS_MEMBERSHIP probe_interval must be > 0, got '0'"),
    ({"CHAOS_MEMBERSHIP": "join_expiry=-1"}, "chaos: CHAOS_MEMBERSHIP join_expiry must be > 0 (or 0: off), got '-1'"),
    ({"CHAOS_SECRET": ""},
     "chaos: CHAOS_SECRET must not be empty (unset it to run without a secret, loopback only), got ''"),
    ({"CHAOS_BACKEND": "zookeeper"},
     "chaos: CHAOS_BACKEND must be an installed rendezvous backend (etcd, peer), got 'zookeeper'"),
    ({"CHAOS_JOIN_TIMEOUT": "soon"}, "chaos: CHAOS_JOIN_TIMEOUT must be a number of seconds > 0, got 'soon'"),
    ({"CHAOS_LEAVE_TIMEOUT": "0"}, "chaos: CHAOS_LEAVE_TIMEOUT must be a number of seconds > 0, got '0'"),
    ({"CHAOS_COLLECTIVE_TIMEOUT": "nan"}, "chaos: CHAOS_COLLECTIVE_TIMEOUT must be a number of seconds > 0, got 'nan'"),
    ({"CHAOS_SWITCH_TIMEOUT": "inf"}, "chaos: CHAOS_SWITCH_TIMEOUT must be a number of seconds > 0, got 'inf'"),
    ({"CHAOS_SIDELINE_TIMEOUT": "-5"}, "chaos: CHAOS_SIDELINE_TIMEOUT must be a number of seconds > 0, got '-5'"),
    ({"CHAOS_ETCD_ENDPOINTS": "etcd"}, "chaos: CHAOS_ETCD_ENDPOINTS must be HOST:PORT, got 'etcd'"),
    ({"CHAOS_ETCD_ENDPOINTS": " , "}, "chaos: CHAOS_ETCD_ENDPOINTS must name at least one HOST:PORT, got ','"),
    ({"CHAOS_ETCD_PREFIX": "chaos"}, "chaos: CHAOS_ETCD_PREFIX must be a key prefix starting with '/', got 'chaos'"),
    ({"CHAOS_ETCD_TTL": "two"}, "chaos: CHAOS_ETCD_TTL must be a number of seconds > 0, got 'two'"),
    ({"CHAOS_ETCD_OP_TIMEOUT": "-1"}, "chaos: CHAOS_ETCD_OP_TIMEOUT must be a number of seconds > 0, got '-1'"),
])
def test_a_bad_variable_is_one_line_naming_it_and_its_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        NodeConfig.resolve(env=env)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


@pytest.mark.parametrize("given, message", [
    ({"min_nodes": 0}, "chaos: min_nodes must be an integer >= 1, got 0"),
    ({"min_nodes": True}, "chaos: min_nodes must be an integer >= 1, got True"),
    ({"global_batch_size": 0}, "chaos: global_batch_size must be an integer >= 1, got 0"),
    ({"bind": "127.0.0.1:65536"}, "chaos: bind port must be 0-65535, got '127.0.0.1:65536'"),
    ({"peers": 7000}, "chaos: peers must be HOST:PORT[,HOST:PORT...] or a list of HOST:PORT, got 7000"),
    ({"secret": b""}, "chaos: secret must not be empty (unset it to run without a secret, loopback only), got ''"),
    ({"membership": "fast"}, "chaos: membership must be a membership preset (local, lan, edge) or a Config, got 'fast'"),
    ({"join_timeout": -1.0}, "chaos: join_timeout must be a number of seconds > 0, got -1.0"),
    ({"backend": "zookeeper"}, "chaos: backend must be an installed rendezvous backend (etcd, peer), got 'zookeeper'"),
])
def test_a_bad_argument_is_one_line_naming_the_argument(given: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        NodeConfig.resolve(env={}, **given)
    assert str(err.value) == message


def test_an_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="preset"):
        NodeConfig.resolve(env={}, preset="lan")


def test_a_flag_that_stands_for_a_variable_is_named_in_its_error() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_flags({"CHAOS_MIN_NODES": ("--min-nodes", "0")}, env={})
    assert str(err.value) == "chaos: --min-nodes must be an integer >= 1, got '0'"
    # a flag not given leaves the variable, and the variable is named
    with pytest.raises(ConfigError, match="^chaos: CHAOS_MIN_NODES "):
        resolve_flags({"CHAOS_MIN_NODES": ("--min-nodes", None)}, env={"CHAOS_MIN_NODES": "x"})
    assert resolve_flags({"CHAOS_PRESET": ("--preset", "lan")}, env={"CHAOS_PRESET": "edge"}).membership == PRESETS["lan"]


def test_the_secret_alone_for_small_clis() -> None:
    assert secret_from_env({"CHAOS_SECRET": "s" * 16}) == b"s" * 16
    assert secret_from_env({}) is None
    assert secret_from_env({"OTHER": "t" * 16}, "OTHER") == b"t" * 16
    with pytest.raises(ConfigError, match="CHAOS_SECRET must not be empty"):
        secret_from_env({"CHAOS_SECRET": ""})


def test_the_secret_is_never_shown() -> None:
    assert "hunter2-hunter2-hunter2" not in repr(NodeConfig.resolve(env={"CHAOS_SECRET": "hunter2-hunter2-hunter2"}))


def test_a_short_secret_is_refused_by_its_length_never_shown() -> None:
    """Issue 15: secrets under 16 bytes are refused at resolution, naming the
    variable and the length only."""
    with pytest.raises(ConfigError) as err:
        NodeConfig.resolve(env={"CHAOS_SECRET": "hunter2"})
    assert str(err.value).startswith("chaos: CHAOS_SECRET must be at least 16 bytes")
    assert str(err.value).endswith("got a secret of 7 bytes") and "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="^chaos: secret must be at least 16 bytes"):
        NodeConfig.resolve(env={}, secret=b"x" * 15)
    with pytest.raises(ConfigError, match="CHAOS_SECRET must be at least 16 bytes"):
        secret_from_env({"CHAOS_SECRET": "short"})
    assert NodeConfig.resolve(env={}, secret=b"x" * 16).secret == b"x" * 16


# ---------------------------------------------------------------------- the README's table
#: a valid value for each variable README documents, and what NodeConfig must then hold
README_VALUES: dict[str, tuple[str, str, object]] = {
    "CHAOS_SECRET": ("s3cret-s3cret-s3cret", "secret", b"s3cret-s3cret-s3cret"),
    "CHAOS_ENCRYPT": ("1", "encrypt", True),
    "CHAOS_PRESET": ("edge", "membership", PRESETS["edge"]),
    "CHAOS_MEMBERSHIP": ("probe_interval=0.3", "membership", Config.preset("local", probe_interval=0.3)),
    "CHAOS_BACKEND": ("etcd", "backend", "etcd"),
    "CHAOS_BIND": ("[::1]:7000", "bind", "[::1]:7000"),
    "CHAOS_PEERS": ("10.0.0.1:7000, node-2:7000", "peers", ("10.0.0.1:7000", "node-2:7000")),
    "CHAOS_MIN_NODES": ("4", "min_nodes", 4),
    "CHAOS_TARGET_NODES": ("3", "target_nodes", 3),
    "CHAOS_MAX_NODES": ("5", "max_nodes", 5),
    "CHAOS_STANDBY": ("1", "standby", True),
    "CHAOS_MAX_SOURCES": ("3", "max_sources", 3),
    "CHAOS_TRACE": ("/tmp/trace.jsonl", "trace", "/tmp/trace.jsonl"),
    "CHAOS_RECORD_SAMPLES": ("1", "record_samples", True),
    "CHAOS_STOP_FREE_JOIN": ("1", "stop_free_join", True),
    "CHAOS_CATCH_UP_STEPS": ("4", "catch_up_steps", 4),
    "CHAOS_FINISH_FAILED_STEPS": ("0", "finish_failed_steps", False),
    "CHAOS_GROUPS_AHEAD": ("0", "groups_ahead", False),
    "CHAOS_SHARES": ("adaptive", "shares", "adaptive"),
    "CHAOS_STRAGGLER": ("0.5", "straggler", 0.5),
    "CHAOS_STRAGGLER_RETRY": ("7.5", "straggler_retry", 7.5),
    "CHAOS_GC_FREEZE": ("0", "gc_freeze", False),
    "CHAOS_METRICS": ("127.0.0.1:9400", "metrics", "127.0.0.1:9400"),
    "CHAOS_GLOBAL_BATCH_SIZE": ("96", "global_batch_size", 96),
    "CHAOS_JOIN_TIMEOUT": ("42", "join_timeout", 42.0),
    "CHAOS_LEAVE_TIMEOUT": ("4.5", "leave_timeout", 4.5),
    "CHAOS_COLLECTIVE_TIMEOUT": ("12", "collective_timeout", 12.0),
    "CHAOS_SWITCH_TIMEOUT": ("2", "switch_timeout", 2.0),
    "CHAOS_SIDELINE_TIMEOUT": ("60", "sideline_timeout", 60.0),
    "CHAOS_ETCD_ENDPOINTS": ("http://10.0.0.9:2379,10.0.0.8:2379", "etcd_endpoints", "10.0.0.9:2379,10.0.0.8:2379"),
    "CHAOS_ETCD_PREFIX": ("/job7/", "etcd_prefix", "/job7"),
    "CHAOS_ETCD_TTL": ("3", "etcd_ttl", 3.0),
    "CHAOS_ETCD_OP_TIMEOUT": ("1.5", "etcd_op_timeout", 1.5),
}


def readme_variables() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `CHAOS_")]
    names = [name for row in rows for name in re.findall(r"`(CHAOS_[A-Z_]+)`", row.split("|")[1])]
    assert names, "README's Configuration table lists no variable"
    return names


@pytest.mark.parametrize("var", readme_variables())
def test_every_variable_the_readme_documents_is_read_by_node_config(var: str) -> None:
    assert var in README_VALUES, f"README documents {var}, which this test (and so NodeConfig) does not know"
    raw, attr, expected = README_VALUES[var]
    assert getattr(NodeConfig(), attr) != expected, "the test value must differ from the default"
    assert getattr(NodeConfig.resolve(env={**NEEDS.get(var, {}), var: raw}), attr) == expected


#: what a variable needs besides itself to resolve
NEEDS = {"CHAOS_ENCRYPT": {"CHAOS_SECRET": "s3cret-s3cret-s3cret"}}


def test_the_size_policy_reaches_the_membership_config_a_founder_writes_into_its_views() -> None:
    cfg = NodeConfig.resolve(env={"CHAOS_TARGET_NODES": "2", "CHAOS_MAX_NODES": "3"})
    membership = cfg.rendezvous_kwargs()["membership"]
    assert (membership.target_nodes, membership.max_nodes) == (2, 3)
    assert NodeConfig.resolve(env={}).rendezvous_kwargs()["membership"] == PRESETS["local"]


def test_encryption_travels_with_the_secret_and_needs_one() -> None:
    """``CHAOS_ENCRYPT=1`` makes the secret a ``wire.auth.Secret`` that
    encrypts (so every component handed the secret speaks the mode); without
    a secret it is refused, and the small CLIs' secret follows it too."""
    cfg = NodeConfig.resolve(env={"CHAOS_SECRET": "s" * 16, "CHAOS_ENCRYPT": "1"})
    assert cfg.encrypt and encrypts(cfg.secret) and cfg.secret == b"s" * 16
    assert "s" * 16 not in repr(cfg) and "s" * 16 not in repr(cfg.secret)
    assert not encrypts(NodeConfig.resolve(env={"CHAOS_SECRET": "s" * 16}).secret)
    assert encrypts(NodeConfig.resolve(env={"CHAOS_SECRET": "s" * 16}, encrypt=True).secret)
    with pytest.raises(ConfigError, match="^chaos: CHAOS_ENCRYPT needs the cluster secret"):
        NodeConfig.resolve(env={"CHAOS_ENCRYPT": "1"})
    with pytest.raises(ConfigError, match="^chaos: encrypt needs the cluster secret"):
        NodeConfig.resolve(env={}, encrypt=True)
    with pytest.raises(ConfigError, match="^chaos: CHAOS_ENCRYPT needs"):  # ChaosStrategy passes None: not given
        NodeConfig.resolve(env={"CHAOS_ENCRYPT": "1"}, encrypt=None)
    assert encrypts(secret_from_env({"CHAOS_SECRET": "s" * 16, "CHAOS_ENCRYPT": "yes"}))
    # the mode survives what components do with a secret: load it again, pickle it
    assert encrypts(load_secret(cfg.secret)) and encrypts(pickle.loads(pickle.dumps(cfg.secret)))


# ---------------------------------------------------------------------- the one HOST:PORT parser
@pytest.mark.parametrize("text, port0, expected", [
    ("127.0.0.1:7000", False, ("127.0.0.1", 7000)),
    (" node-1.example.com:80 ", False, ("node-1.example.com", 80)),
    ("[::1]:7000", False, ("::1", 7000)),
    ("[fe80::1%eth0]:7000", False, ("fe80::1%eth0", 7000)),
    ("localhost:0", True, ("localhost", 0)),
])
def test_parse_hostport_accepts(text: str, port0: bool, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, allow_port0=port0) == expected
    assert parse_hostport(format_hostport(*expected), allow_port0=port0) == expected


@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", "must be HOST:PORT"),
    (":80", "must be HOST:PORT"),
    ("h:", "must be HOST:PORT"),
    ("h:0", "port must be 1-65535"),
    ("h:65536", "port must be 1-65535"),
    ("h:99999999999999999999999", "port must be 1-65535"),
    ("h:-1", "port '-1' is not a number"),
    ("h:٣", "port '٣' is not a number"),
    ("::1:80", "must bracket an IPv6 address"),
    ("[::1:80", "has unbalanced brackets"),
    ("[nothex]:80", "host 'nothex' is not an IPv6 address"),
    ("1.2.3:80", "neither an IP address nor a host name"),
    ("a b:1", "neither an IP address nor a host name"),
])
def test_parse_hostport_refuses_in_one_line(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_hostport(text)
    assert reason in err.value.reason and str(err.value).startswith(f"invalid address {text!r}: ")


def test_a_list_of_addresses_is_normalized() -> None:
    assert parse_hostport_list("a:1, [::1]:2,,") == ("a:1", "[::1]:2")


def test_with_no_preset_named_a_loopback_bind_gets_local_and_any_other_gets_lan():
    """``local`` evicts a node silent for ~0.7 s: right for processes of one
    machine, wrong for a network, where a GC pause or a slow checkpoint
    write would cost a node its place (issue 14)."""
    from chaos_lightning.membership.config import EDGE, LAN, LOCAL

    secret = {"CHAOS_SECRET": "s" * 32}
    assert NodeConfig.resolve(env={}).membership == LOCAL
    assert NodeConfig.resolve(env={"CHAOS_BIND": "[::1]:0"}).membership == LOCAL
    assert NodeConfig.resolve(env={"CHAOS_BIND": "10.1.2.3:5000", **secret}).membership == LAN
    assert NodeConfig.resolve(env={"CHAOS_BIND": "0.0.0.0:5000", **secret}).membership == LAN
    assert NodeConfig.resolve(bind="10.1.2.3:5000", env=secret).membership == LAN
    # a preset named, or overrides of the bind's default, still win
    assert NodeConfig.resolve(env={"CHAOS_BIND": "10.1.2.3:5000", "CHAOS_PRESET": "edge", **secret}).membership == EDGE
    tuned = NodeConfig.resolve(env={"CHAOS_BIND": "10.1.2.3:5000", "CHAOS_MEMBERSHIP": "probe_interval=0.3", **secret})
    import dataclasses

    assert tuned.membership == dataclasses.replace(LAN, probe_interval=0.3)


def test_the_strategy_takes_every_training_setting_by_keyword() -> None:
    """``ChaosStrategy(...)`` names every setting a training script may give
    in code (the etcd baseline's, the leave bound and the trace file stay
    environment-only: they belong to how a node is run, not to the script)."""
    import inspect

    import chaos_lightning

    params = set(inspect.signature(chaos_lightning.ChaosStrategy.__init__).parameters)
    env_only = {"etcd_endpoints", "etcd_op_timeout", "etcd_prefix", "etcd_ttl", "leave_timeout", "trace"}
    assert {f.name for f in fields(NodeConfig)} - params == env_only
    s = chaos_lightning.ChaosStrategy(target_nodes=2, max_nodes=3, shares="adaptive")
    assert (s.config.target_nodes, s.config.max_nodes, s.config.shares) == (2, 3, "adaptive")
