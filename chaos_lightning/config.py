"""A node's configuration, resolved once at the top and passed down as one object.

Role in the whole: every setting a node has (where it listens, whom it joins
through, the cluster secret, the membership timing, the training bounds, the
etcd baseline's knobs) is read here, from the caller's arguments and the
``CHAOS_*`` environment, validated, and frozen into a :class:`NodeConfig`.
The entry points (``ChaosStrategy``, ``chaos-run``, the torchrun plugin, the
``python -m`` CLIs) call :meth:`NodeConfig.resolve`; nothing below them reads
the environment: the wire layer, the membership machine, the agent, the
rendezvous backends and the replication layer take plain values and objects.

Precedence, per setting: a value the caller gives (not ``None``) wins over the
environment, which wins over the default.  An empty environment value counts
as unset, except ``CHAOS_SECRET=``, which is refused: an empty secret would
silently mean "no secret".  A secret shorter than 16 bytes
(``wire.auth.MIN_SECRET_BYTES``) is refused too, naming its length only.

Errors are one line, a :class:`ConfigError` (a ``ValueError``) that names the
variable (or the keyword argument) and quotes the bad value::

    chaos: CHAOS_MIN_NODES must be an integer >= 1, got 'abc'
    chaos: CHAOS_BIND port must be 0-65535, got '127.0.0.1:99999'

The variables (README "Configuration" lists the same, and a test holds the
two together):

=========================  ===========================================  ======================
variable                   setting                                      default
=========================  ===========================================  ======================
``CHAOS_BACKEND``          rendezvous backend (an installed entry       ``peer``
                           point of ``chaos_lightning.rendezvous``)
``CHAOS_BIND``             ``host:port`` this node listens on           ``127.0.0.1:0``
``CHAOS_PEERS``            comma-separated members to join through      empty (found)
``CHAOS_SECRET``           the cluster secret                           unset (loopback only)
``CHAOS_ENCRYPT``          encrypt every frame (ChaCha20; 1/0; needs    0 (off: integrity only)
                           the secret and ``cryptography``)
``CHAOS_PRESET``           membership timing preset (``local`` when     ``local`` or ``lan``
                           the bind address is loopback, else ``lan``)
``CHAOS_MEMBERSHIP``       field overrides of the preset,               none
                           ``probe_interval=0.3,suspicion_mult=3``
``CHAOS_MIN_NODES``        members before training starts               1
``CHAOS_TARGET_NODES``     members the cluster admits joiners up to;    unset (no bound)
                           more wait as standbys (founder's value)
``CHAOS_MAX_NODES``        members above which the newest retire        unset (no bound)
``CHAOS_STANDBY``          this process is a warm standby: no join      0 (off)
                           timeout while the cluster is at its target
``CHAOS_GLOBAL_BATCH_SIZE`` constant global batch                       unset
``CHAOS_MAX_SOURCES``      members a joiner pulls the state from        8
``CHAOS_JOIN_TIMEOUT``     seconds to become a member                   120
``CHAOS_LEAVE_TIMEOUT``    seconds a graceful leave may take            15
``CHAOS_COLLECTIVE_TIMEOUT`` bound on every collective, seconds         30
``CHAOS_SWITCH_TIMEOUT``   bound on a view switch's agreement, seconds  5
``CHAOS_SIDELINE_TIMEOUT`` seconds a sidelined member waits             600
``CHAOS_TRACE``            JSON-lines timeline file                     unset
``CHAOS_RECORD_SAMPLES``   keep the ledger of trained samples (1/0)     0 (off)
``CHAOS_STOP_FREE_JOIN``   a joiner pulls behind the members' steps     0 (off)
``CHAOS_CATCH_UP_STEPS``   most steps such a joiner replays             32
``CHAOS_FINISH_FAILED_STEPS`` a step a member's failure broke is        1 (on)
                           finished by the others in the next group
``CHAOS_GROUPS_AHEAD``     a survivor builds the group of a view        1 (on)
                           without a member as it commits (overlapped)
``CHAOS_SHARES``           each member's share of the global batch:     ``equal``
                           ``equal`` or ``adaptive`` (by measured speed)
``CHAOS_METRICS``          ``host:port`` of the Prometheus endpoint     unset (off)
``CHAOS_GC_FREEZE``        freeze the heap out of full garbage          1 (on)
                           collections when training starts
``CHAOS_ETCD_*``           the etcd baseline: ``ENDPOINTS``,            ``127.0.0.1:2379``,
                           ``PREFIX``, ``TTL``, ``OP_TIMEOUT``          ``/chaos``, 2, 5
=========================  ===========================================  ======================

One join bound for every entry point (120 s): the Trainer's, which must
cover a joiner's imports, the members' next step boundary and the state
transfer on a loaded 2-core machine; the rendezvous CLI used 30 s, which only
ever shortened the wait before a failure was reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from chaos_lightning.membership.config import DEFAULT_PRESET, PRESETS, Config, default_preset
from chaos_lightning.replication.neighbors import DEFAULT_MAX_SOURCES
from chaos_lightning.wire.addr import AddressError, normalize_hostport, parse_hostport
from chaos_lightning.wire.auth import ENCRYPT_ENV, MIN_SECRET_BYTES, Secret, check_encryption_available

#: the variable holding the cluster secret (the launcher can read another: ``--secret-env``)
SECRET_ENV = "CHAOS_SECRET"
#: set by an outside launcher that starts several processes per node with
#: one ``CHAOS_BIND`` (the torchrun plugin): each splits it by ``LOCAL_RANK``
#: (:func:`chaos_lightning.strategy.devices.child_options`)
SPLIT_BY_LOCAL_RANK_ENV = "CHAOS_SPLIT_BY_LOCAL_RANK"


class ConfigError(ValueError):
    """A setting with a bad value: one line, naming the variable or argument and the value."""

    def __init__(self, name: str, requirement: str, value: object):
        self.name = name
        self.requirement = requirement
        self.value = value
        super().__init__(f"chaos: {name} {requirement}, got {value!r}")


def _default_membership() -> Config:
    return PRESETS[DEFAULT_PRESET]


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of one node, validated (see the module docstring for each one's variable)."""

    #: rendezvous backend, an entry point name of the ``chaos_lightning.rendezvous`` group
    backend: str = "peer"
    #: ``host:port`` this node listens on and is known by (port 0: the OS picks)
    bind: str = "127.0.0.1:0"
    #: members to join through; empty: this node founds the cluster
    peers: tuple[str, ...] = ()
    #: the cluster secret (``None``: loopback only, see ``wire.auth.check_bind_allowed``);
    #: a ``wire.auth.Secret`` that encrypts when :attr:`encrypt` is set
    secret: bytes | None = field(default=None, repr=False)
    #: encrypt every frame after the handshake, not only tag it (WAN use; every node alike)
    encrypt: bool = False
    #: the membership protocol's timing (a preset, possibly with fields overridden)
    membership: Config = field(default_factory=_default_membership)
    #: training starts once a view has this many members
    min_nodes: int = 1
    #: the size policy (``membership/policy.py``): joiners are admitted while
    #: a view has fewer than ``target_nodes`` members (never above
    #: ``max_nodes``); the rest wait as standbys; members above ``max_nodes``
    #: retire, newest first.  None: no bound.  A founder's values are the
    #: cluster's (written into its views); a joiner's are ignored
    target_nodes: int | None = None
    max_nodes: int | None = None
    #: this process is a warm standby: its ``fit`` waits as a pending joiner
    #: for as long as the cluster stays at its target (no join timeout)
    standby: bool = False
    #: samples per step over the whole world (None: the DataLoader's batch per node)
    global_batch_size: int | None = None
    #: members a joiner pulls the state from at once
    max_sources: int = DEFAULT_MAX_SOURCES
    #: seconds to wait to become a member
    join_timeout: float = 120.0
    #: seconds a graceful leave may take
    leave_timeout: float = 15.0
    #: bound on every collective, seconds (the membership layer usually ends a stuck one sooner)
    collective_timeout: float = 30.0
    #: bound on agreeing a view switch at a step boundary, seconds
    switch_timeout: float = 5.0
    #: seconds a member cut off from an older trainer waits for the link before giving up
    sideline_timeout: float = 600.0
    #: file this node appends its timeline to (JSON lines), or None
    trace: str | None = None
    #: keep the strategy's ledger of every trained sample (exactly-once checks;
    #: memory grows with the samples trained, so off unless asked for)
    record_samples: bool = False
    #: a joiner enters the group at once as a *shadow* (zero weight) and pulls
    #: the state behind the members' steps, then catches up by replaying the
    #: steps it saw (docs/join.md); off: the members wait for the transfer
    stop_free_join: bool = False
    #: the most steps a shadow replays; past it the joiner waits for its pull
    catch_up_steps: int = 32
    #: a step whose gradient reduction a member's failure broke is finished
    #: by the others in the next group, with their own gradients of it (the
    #: failed member's samples go back to the epoch); off: the step is
    #: trained again from its start (docs/strategy.md)
    finish_failed_steps: bool = True
    #: a view that only takes members out of this node's group has its
    #: group built on a helper thread as soon as it commits, while this node
    #: still trains its step; off: built at the step boundary (docs/strategy.md)
    groups_ahead: bool = True
    #: how a step's samples are split over the members: ``equal``, or
    #: ``adaptive`` (each member's share follows its measured speed, so slow
    #: and fast members finish each step together; docs/shares.md)
    shares: str = "equal"
    #: with adaptive shares: a member steps down to a standby when the
    #: others alone would be faster by more than this fraction, even at its
    #: smallest share (0: never; docs/shares.md)
    straggler: float = 0.25
    #: seconds a member that stepped down waits before asking to join again
    #: (to be measured again); doubled each time it steps down, at most 16x
    straggler_retry: float = 60.0
    #: ``host:port`` of this node's Prometheus metrics endpoint, or None (off)
    metrics: str | None = None
    #: when training starts, move what the process holds into the
    #: interpreter's permanent generation (``gc.freeze``), so that a full
    #: garbage collection, one node at a time, stops stalling every member's
    #: step (``strategy.environment.freeze_heap``)
    gc_freeze: bool = True
    #: the etcd baseline: ``host:port[,host:port...]``, key prefix, lease TTL and per-call bound (s)
    etcd_endpoints: str = "127.0.0.1:2379"
    etcd_prefix: str = "/chaos"
    etcd_ttl: float = 2.0
    etcd_op_timeout: float = 5.0

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **given: Any) -> NodeConfig:
        """The configuration from ``given`` (keyword arguments, ``None`` = not given),
        else ``env`` (``None``: ``os.environ``), else the defaults; validated.

        Raises :class:`ConfigError` naming the argument or variable at fault.
        """
        env = os.environ if env is None else env
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"NodeConfig.resolve() got unknown setting(s): {', '.join(unknown)}")
        r = _Resolver(env, given)
        bind = r.address("bind", "CHAOS_BIND", cls.bind)
        encrypt = r.boolean("encrypt", ENCRYPT_ENV, cls.encrypt)
        min_nodes = r.integer("min_nodes", "CHAOS_MIN_NODES", cls.min_nodes)
        target_nodes = r.integer("target_nodes", "CHAOS_TARGET_NODES", None)
        max_nodes = r.integer("max_nodes", "CHAOS_MAX_NODES", None)
        # min <= target <= max: training must be able to start under the policy
        if target_nodes is not None and min_nodes > target_nodes:
            raise ConfigError(r.name_of("target_nodes", "CHAOS_TARGET_NODES"),
                              f"must be >= min_nodes ({min_nodes}): no more would ever be admitted", target_nodes)
        floor = max(min_nodes, target_nodes or 0)
        if max_nodes is not None and max_nodes < floor:
            raise ConfigError(r.name_of("max_nodes", "CHAOS_MAX_NODES"),
                              f"must be >= min_nodes and target_nodes ({floor})", max_nodes)
        return cls(
            backend=r.backend("backend", "CHAOS_BACKEND", cls.backend),
            bind=bind,
            peers=r.addresses("peers", "CHAOS_PEERS"),
            secret=r.encrypting(r.secret("secret", SECRET_ENV), encrypt, SECRET_ENV),
            encrypt=encrypt,
            # no preset named: local on loopback, lan on any other address
            membership=r.membership("membership", "CHAOS_PRESET", "CHAOS_MEMBERSHIP",
                                    default=default_preset(parse_hostport(bind, allow_port0=True)[0])),
            min_nodes=min_nodes,
            target_nodes=target_nodes,
            max_nodes=max_nodes,
            standby=r.boolean("standby", "CHAOS_STANDBY", cls.standby),
            global_batch_size=r.integer("global_batch_size", "CHAOS_GLOBAL_BATCH_SIZE", None),
            max_sources=r.integer("max_sources", "CHAOS_MAX_SOURCES", cls.max_sources),
            join_timeout=r.seconds("join_timeout", "CHAOS_JOIN_TIMEOUT", cls.join_timeout),
            leave_timeout=r.seconds("leave_timeout", "CHAOS_LEAVE_TIMEOUT", cls.leave_timeout),
            collective_timeout=r.seconds("collective_timeout", "CHAOS_COLLECTIVE_TIMEOUT", cls.collective_timeout),
            switch_timeout=r.seconds("switch_timeout", "CHAOS_SWITCH_TIMEOUT", cls.switch_timeout),
            sideline_timeout=r.seconds("sideline_timeout", "CHAOS_SIDELINE_TIMEOUT", cls.sideline_timeout),
            trace=r.text("trace", "CHAOS_TRACE", None),
            record_samples=r.boolean("record_samples", "CHAOS_RECORD_SAMPLES", cls.record_samples),
            stop_free_join=r.boolean("stop_free_join", "CHAOS_STOP_FREE_JOIN", cls.stop_free_join),
            catch_up_steps=r.integer("catch_up_steps", "CHAOS_CATCH_UP_STEPS", cls.catch_up_steps),
            finish_failed_steps=r.boolean("finish_failed_steps", "CHAOS_FINISH_FAILED_STEPS", cls.finish_failed_steps),
            groups_ahead=r.boolean("groups_ahead", "CHAOS_GROUPS_AHEAD", cls.groups_ahead),
            shares=r.choice("shares", "CHAOS_SHARES", cls.shares, ("equal", "adaptive")),
            straggler=r.fraction("straggler", "CHAOS_STRAGGLER", cls.straggler),
            straggler_retry=r.seconds("straggler_retry", "CHAOS_STRAGGLER_RETRY", cls.straggler_retry),
            metrics=r.address("metrics", "CHAOS_METRICS", None),
            gc_freeze=r.boolean("gc_freeze", "CHAOS_GC_FREEZE", cls.gc_freeze),
            etcd_endpoints=r.endpoints("etcd_endpoints", "CHAOS_ETCD_ENDPOINTS", cls.etcd_endpoints),
            etcd_prefix=r.prefix("etcd_prefix", "CHAOS_ETCD_PREFIX", cls.etcd_prefix),
            etcd_ttl=r.seconds("etcd_ttl", "CHAOS_ETCD_TTL", cls.etcd_ttl),
            etcd_op_timeout=r.seconds("etcd_op_timeout", "CHAOS_ETCD_OP_TIMEOUT", cls.etcd_op_timeout),
        )

    @property
    def bind_host(self) -> str:
        """The host part of :attr:`bind`, without IPv6 brackets."""
        return parse_hostport(self.bind, allow_port0=True)[0]

    def rendezvous_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`chaos_lightning.rendezvous.create` this configuration fixes."""
        membership = self.membership
        if self.target_nodes or self.max_nodes:  # the policy this node writes into a cluster it founds
            membership = replace(membership, target_nodes=self.target_nodes or 0, max_nodes=self.max_nodes or 0)
        return dict(
            backend=self.backend, bind=self.bind, peers=self.peers, secret=self.secret, membership=membership,
            etcd_endpoints=self.etcd_endpoints, etcd_prefix=self.etcd_prefix, etcd_ttl=self.etcd_ttl,
            etcd_op_timeout=self.etcd_op_timeout,
        )


def secret_from_env(env: Mapping[str, str] | None = None, var: str = SECRET_ENV) -> bytes | None:
    """The cluster secret from ``var`` (``None`` when unset; :class:`ConfigError` when empty),
    encrypting when ``CHAOS_ENCRYPT`` says so.

    For the small CLIs that need the secret and nothing else of a node's
    configuration (``python -m chaos_lightning.replication``).
    """
    r = _Resolver(os.environ if env is None else env, {})
    return r.encrypting(r.secret("secret", var), r.boolean("encrypt", ENCRYPT_ENV, False), var)


def resolve_flags(flags: Mapping[str, tuple[str, object]], env: Mapping[str, str] | None = None,
                  **given: Any) -> NodeConfig:
    """:meth:`NodeConfig.resolve` for a command line whose flags stand for variables.

    ``flags`` maps a variable to ``(flag, value)``: a value that is not
    ``None`` (the flag was given) overrides the variable, and an error about
    it names the flag (``chaos: --min-nodes must be an integer >= 1, got '0'``)
    rather than the variable.  The same overlay is what a launcher passes to
    its children, so parent and children resolve the same configuration.
    """
    overlay = dict(os.environ if env is None else env)
    names: dict[str, str] = {}
    for var, (flag, value) in flags.items():
        if value is not None:
            overlay[var] = str(value)
            names[var] = flag
    try:
        return NodeConfig.resolve(env=overlay, **given)
    except ConfigError as exc:
        if exc.name in names:
            raise ConfigError(names[exc.name], exc.requirement, exc.value) from None
        raise


# ---------------------------------------------------------------------- membership overrides
def parse_membership_overrides(text: str, name: str = "CHAOS_MEMBERSHIP") -> dict[str, object]:
    """``"probe_interval=0.3,auto_rejoin=false"`` as typed field values of a membership ``Config``.

    Items are separated by ``,`` or ``;`` (the torchrun plugin needs ``;``:
    torchrun splits its ``--rdzv-conf`` at commas).  Each value takes the
    type of the field's default (float, int or bool);
    ``name`` is what an error names (the variable, or a CLI flag).
    """
    defaults = {f.name: getattr(PRESETS[DEFAULT_PRESET], f.name) for f in fields(Config)}
    out: dict[str, object] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(name, "must be FIELD=VALUE[,FIELD=VALUE...]", item)
        if key not in defaults:
            raise ConfigError(name, f"names no membership setting (known: {', '.join(sorted(defaults))})", key)
        out[key] = _typed(name, key, raw, defaults[key])
    return out


def _typed(name: str, key: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"{key} must be true or false", raw)
    try:
        value = int(raw) if isinstance(default, int) else float(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(name, f"{key} must be {kind} > 0", raw) from None
    if not (isinstance(value, int) or math.isfinite(value)) or value < 0 or (value == 0 and key not in _ZERO_OFF):
        raise ConfigError(name, f"{key} must be > 0" + (" (or 0: off)" if key in _ZERO_OFF else ""), raw)
    return value


#: membership settings whose 0 turns the feature off
_ZERO_OFF = frozenset({"join_expiry"})


def membership_config(preset: str | Config | None = None, overrides: Mapping[str, object] | None = None,
                      *, name: str = "membership", default: str = DEFAULT_PRESET) -> Config:
    """A membership ``Config`` from a preset name (or a Config; ``None``:
    ``default``, see :func:`~chaos_lightning.membership.config.default_preset`)
    and field overrides."""
    if isinstance(preset, Config):
        base = preset
    else:
        preset = default if preset is None else preset
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(name, f"must be a membership preset ({', '.join(PRESETS)}) or a Config", preset)
        base = PRESETS[preset]
    return replace(base, **overrides) if overrides else base  # type: ignore[arg-type]


class _Hidden(str):
    """A stand-in shown instead of a secret: its repr is its text, unquoted."""

    def __repr__(self) -> str:
        return str(self)


# ---------------------------------------------------------------------- the resolver
class _Resolver:
    """Reads one setting at a time: the given value, else the variable, else the default."""

    def __init__(self, env: Mapping[str, str], given: Mapping[str, Any]):
        self.env = env
        self.given = given

    def name_of(self, arg: str, var: str) -> str:
        """The name an error about this setting blames (the argument if given, else the variable)."""
        return self._pick(arg, var)[0] if self._pick(arg, var)[1] is not None else var

    def _pick(self, arg: str, var: str) -> tuple[str, Any]:
        """(the name to blame, the raw value), or (var, None) when neither is set."""
        value = self.given.get(arg)
        if value is not None:
            return arg, value
        raw = self.env.get(var)
        if raw is not None and raw.strip() != "":
            return var, raw.strip()
        return var, None

    def backend(self, arg: str, var: str, default: str) -> str:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        # the installed entry points; a backend's module is imported only by create()
        from chaos_lightning.rendezvous import backends

        names = backends()
        if not isinstance(value, str) or value not in names:
            raise ConfigError(name, f"must be an installed rendezvous backend ({', '.join(names) or 'none installed'})", value)
        return value

    def choice(self, arg: str, var: str, default: str, choices: tuple[str, ...]) -> str:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}", value)
        return value

    def address(self, arg: str, var: str, default: str | None) -> str | None:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        return _address(name, value, allow_port0=True)

    def addresses(self, arg: str, var: str) -> tuple[str, ...]:
        name, value = self._pick(arg, var)
        if value is None:
            return ()
        if isinstance(value, str):
            items: Sequence[object] = value.split(",")
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            raise ConfigError(name, "must be HOST:PORT[,HOST:PORT...] or a list of HOST:PORT", value)
        out = []
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(name, "must list HOST:PORT strings", item)
            if item.strip():
                out.append(_address(name, item, allow_port0=False))
        return tuple(out)

    def endpoints(self, arg: str, var: str, default: str) -> str:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(name, "must be HOST:PORT[,HOST:PORT...]", value)
        parts = []
        for item in value.split(","):
            item = item.strip()
            for scheme in ("http://", "https://"):  # etcd's own spelling of an endpoint
                if item.startswith(scheme):
                    item = item[len(scheme):].rstrip("/")
            if item:
                parts.append(_address(name, item, allow_port0=False))
        if not parts:
            raise ConfigError(name, "must name at least one HOST:PORT", value)
        return ",".join(parts)

    def secret(self, arg: str, var: str) -> bytes | None:
        value = self.given.get(arg)
        name = arg
        if value is None:
            name, value = var, self.env.get(var)
            if value is None:
                return None
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise ConfigError(name, "must be text or bytes", type(value).__name__)
        if not value:
            # never show a secret; an empty one is what there is to show
            raise ConfigError(name, "must not be empty (unset it to run without a secret, loopback only)", "")
        if len(value) < MIN_SECRET_BYTES:
            raise ConfigError(
                name,
                f"must be at least {MIN_SECRET_BYTES} bytes (e.g. python -c 'import secrets; "
                "print(secrets.token_hex(16))')",
                _Hidden(f"a secret of {len(value)} bytes"),
            )
        return bytes(value)

    def encrypting(self, secret: bytes | None, encrypt: bool, secret_var: str) -> bytes | None:
        """``secret`` as a :class:`~chaos_lightning.wire.auth.Secret` that
        encrypts frames when ``encrypt`` is set (which needs a secret and the
        cipher's package)."""
        if not encrypt:
            return secret
        name = "encrypt" if self.given.get("encrypt") is not None else ENCRYPT_ENV  # None: not given
        if secret is None:
            raise ConfigError(name, f"needs the cluster secret ({secret_var}): a public key hides nothing", 1)
        try:
            check_encryption_available()
        except ImportError:
            raise ConfigError(name, "needs the 'cryptography' package (a dependency: pip install 'cryptography>=41')",
                              1) from None
        return Secret(secret, encrypt=True)

    def membership(self, arg: str, preset_var: str, overrides_var: str, *, default: str = DEFAULT_PRESET) -> Config:
        value = self.given.get(arg)
        if value is not None:
            # given as a whole: neither CHAOS_PRESET nor CHAOS_MEMBERSHIP applies
            if isinstance(value, Config):
                return value
            return membership_config(value, name=arg)
        _, preset = self._pick("", preset_var)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(preset_var, f"must be a membership preset ({', '.join(PRESETS)})", preset)
        _, text = self._pick("", overrides_var)
        overrides = parse_membership_overrides(text, overrides_var) if text is not None else {}
        return membership_config(preset, overrides, name=preset_var, default=default)

    def integer(self, arg: str, var: str, default: int | None) -> int | None:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if isinstance(value, bool):
            raise ConfigError(name, "must be an integer >= 1", value)
        number = value
        if isinstance(value, str):
            try:
                number = int(value, 10)
            except ValueError:
                raise ConfigError(name, "must be an integer >= 1", value) from None
        if not isinstance(number, int) or number < 1:
            raise ConfigError(name, "must be an integer >= 1", value)  # as written, not as parsed
        return number

    def seconds(self, arg: str, var: str, default: float) -> float:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if isinstance(value, bool):
            raise ConfigError(name, "must be a number of seconds > 0", value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, "must be a number of seconds > 0", value) from None
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(name, "must be a number of seconds > 0", value)
        return number

    def fraction(self, arg: str, var: str, default: float) -> float:
        """A number >= 0 (0: off)."""
        name, value = self._pick(arg, var)
        if value is None:
            return default
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise ConfigError(name, "must be a fraction >= 0 (0: off)", value)
        return number

    def boolean(self, arg: str, var: str, default: bool) -> bool:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        low = str(value).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, "must be 1 or 0 (true or false)", value)

    def text(self, arg: str, var: str, default: str | None) -> str | None:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(name, "must be a path", value)
        return os.fspath(value)

    def prefix(self, arg: str, var: str, default: str) -> str:
        name, value = self._pick(arg, var)
        if value is None:
            return default
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(name, "must be a key prefix starting with '/'", value)
        return value.rstrip("/") or "/"


def _address(name: str, value: object, *, allow_port0: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, "must be a HOST:PORT string", value)
    try:
        return normalize_hostport(value, allow_port0=allow_port0)
    except AddressError as exc:
        raise ConfigError(name, exc.reason, value.strip()) from None


__all__ = [
    "ConfigError",
    "NodeConfig",
    "SECRET_ENV",
    "membership_config",
    "parse_membership_overrides",
    "resolve_flags",
    "secret_from_env",
]
