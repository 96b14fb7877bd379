"""A cluster: nodes of GPUs of one device profile, joined by intra- and inter-node links.

`a100-80g:1024` means 1024 GPUs of the `a100-80g` profile in nodes of the profile's
`gpus_per_node` (8) with its default links; a cluster YAML names nodes, gpus_per_node, the
device profile (a name from profiles/ or a path) and, optionally, its own links.
Profiles compose: a profile with `extends: NAME` overrides fields of NAME.

A CPU profile names `host_cores`: its "GPUs" are processes that share those cores, one
thread each (torchrun's OMP_NUM_THREADS=1), and its figures were measured on one thread. With
p processes on c cores, each process runs at 1 / max(1, p/c) of those figures (compute, memory
bandwidth, host overheads), link bandwidth divides by the same factor, every hop of a
collective waits `host_wait_us` more per extra process per core (the peer is descheduled;
latency_us itself is measured in situ, between compute), each process holds 1/p of the
memory, and communication does not overlap compute (gloo runs on the same cores).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from costmodel.errors import ConfigError
from costmodel.hardware import Device, EfficiencyCurve, MemoryOverhead
from costmodel.network import Group, Link, group_on_mesh
from costmodel.runtime import DEFAULT_RUNTIME, FUSED, TrainingRuntime, load_runtime

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    name: str
    device: Device
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link
    # set where the "GPUs" are processes sharing this many cores of each node (a CPU profile)
    host_cores: int | None = None
    runtime: TrainingRuntime = FUSED  # the training software that is priced (named in plans and output)
    profile: str = ""  # the hardware profile's name
    host_band: tuple[float, float] | None = None  # a measured host's fidelity residuals (prediction_band)

    @property
    def cost_runtime(self) -> TrainingRuntime:
        """The runtime whose terms the cost model applies: `runtime` on GPUs; on a measured CPU
        host, calibrated with the runtime that ran on it, the fused one (which adds nothing)."""
        return self.runtime if self.host_cores is None else FUSED

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"cluster {self.name}: nodes and gpus_per_node must be positive")

    @property
    def profile_note(self) -> str:
        """What a reader of the prediction must know about the profile that priced it ("" if nothing)."""
        if self.device.arch == "cpu" and self.host_cores is None:
            return (f"profile {self.profile} is a datasheet guess without the host's overheads (on a 2-core machine "
                    "it predicts steps about 40x too fast); for this machine measure one with `paraplan profile -o "
                    "profiles/host.yaml` and plan on profiles/host.yaml:N, or use cpu-2core:N (measured on a 2-core VM)")
        return ""

    @property
    def overlaps_comm(self) -> bool:
        """A communication stream runs beside compute (GPUs); processes sharing a host's cores
        spend those same cores on gloo, so nothing overlaps there."""
        return self.host_cores is None

    @property
    def oversubscription(self) -> float:
        return oversubscription(self.gpus_per_node, self.host_cores)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def group(self, size: int, stride: int) -> Group:
        """The group of `size` ranks `stride` apart in rank order."""
        return group_on_mesh(size, stride, self.gpus_per_node, self.intra, self.inter)

    def p2p_link(self, stride: int) -> Link:
        """Link between ranks `stride` apart (pipeline neighbours)."""
        return self.intra if self.nodes == 1 or stride < self.gpus_per_node else self.inter


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the file's syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long or otherwise impossible is simply not there
        return False


def load_profile_data(name_or_path: str, profiles_dir: Path = PROFILES_DIR, _seen: tuple = ()) -> dict:
    """The merged mapping of a profile (following `extends`)."""
    if not isinstance(name_or_path, str) or not name_or_path or "\n" in name_or_path or len(name_or_path) > 255:
        raise ConfigError(f"device must be a profile name ({', '.join(available_profiles(profiles_dir))}) or a "
                          "profile YAML path")
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and _exists(path)):
        path = profiles_dir / f"{name_or_path}.yaml"
    if not _exists(path):
        raise ConfigError(
            f"unknown device '{name_or_path}'; known devices: {', '.join(available_profiles(profiles_dir))} "
            "(or give a profile YAML path)"
        )
    if str(path) in _seen:
        raise ConfigError(f"profile {path} extends itself in a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is not None:
        data = _merge(load_profile_data(str(parent), profiles_dir, _seen + (str(path),)), data)
    data.setdefault("name", path.stem)
    return data


def _section(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: field '{key}' is missing or not a mapping")
    return value


def _link(data: dict, where: str) -> Link:
    try:
        return Link(
            bandwidth_gb_per_s=float(data["bandwidth_gb_per_s"]),
            latency_us=float(data["latency_us"]),
            efficiency=float(data["efficiency"]),
            call_us=float(data.get("call_us", 0.0)),
            tree_allreduce=bool(data.get("tree_allreduce", False)),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: link lacks {exc.args[0]} (needs bandwidth_gb_per_s, latency_us, efficiency)") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: link figures must be numbers") from None


def _pair(value) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("not a pair")
    return tuple(float(v) for v in value)


def _curve(points) -> EfficiencyCurve | None:
    return None if points is None else EfficiencyCurve(tuple(tuple(p) for p in points))


def device_from_data(data: dict) -> Device:
    name = str(data.get("name", "device"))
    dev = _section(data, "device", f"profile {name}")
    try:
        overhead = dev.get("memory_overhead", {"fixed_gib": 0.0, "fragmentation": 0.0})
        return Device(
            name=name,
            peak_tflops={str(k): float(v) for k, v in _section(dev, "peak_tflops", f"profile {name}").items()},
            hbm_gib=float(dev["hbm_gib"]),
            hbm_gb_per_s=float(dev["hbm_gb_per_s"]),
            hbm_efficiency=float(dev["hbm_efficiency"]),
            gemm_efficiency=EfficiencyCurve(tuple(tuple(p) for p in dev["gemm_efficiency"])),
            attention_efficiency=EfficiencyCurve(
                tuple(tuple(p) for p in dev.get("attention_efficiency", dev["gemm_efficiency"]))
            ),
            memory_overhead=MemoryOverhead(
                fixed_gib=float(overhead["fixed_gib"]), fragmentation=float(overhead["fragmentation"])
            ),
            layer_overhead_us=_pair(dev.get("layer_overhead_us", (0.0, 0.0))),
            tp_layer_overhead_us=_pair(dev.get("tp_layer_overhead_us", (0.0, 0.0))),
            fsdp_layer_overhead_us=_pair(dev.get("fsdp_layer_overhead_us", (0.0, 0.0))),
            optimizer_overhead_us=_pair(dev.get("optimizer_overhead_us", (0.0, 0.0))),
            skinny_gemm_efficiency=_curve(dev.get("skinny_gemm_efficiency")),
            decode_attention_efficiency=_curve(dev.get("decode_attention_efficiency")),
            attention_backward_efficiency=_curve(dev.get("attention_backward_efficiency")),
            arch=str(data.get("arch", "")),
            mfu_peak_tflops={str(k): float(v) for k, v in (dev.get("mfu_peak_tflops") or {}).items()},
            best_published_mfu=float((data.get("best_published_mfu") or {}).get("mfu", 0.0)),
        )
    except KeyError as exc:
        raise ConfigError(f"profile {name}: device lacks field {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"profile {name}: device figures must be numbers ([size, efficiency] pairs for curves)") from None


def load_cluster(text: str, profiles_dir: Path = PROFILES_DIR, *,
                 runtime: str | TrainingRuntime = DEFAULT_RUNTIME) -> Cluster:
    """Parse `DEVICE:COUNT` or a cluster YAML path; `runtime` names the training runtime
    profile that prices it (profiles/runtimes/)."""
    rt = runtime if isinstance(runtime, TrainingRuntime) else load_runtime(runtime)
    return with_runtime(_load_cluster(text, profiles_dir), rt)


def with_runtime(cluster: Cluster, runtime: TrainingRuntime) -> Cluster:
    """The cluster priced for `runtime`: its attention kernel's cap on the device's curves
    (GPU devices only; the share of the compute rates sustained beside data-parallel
    collectives is applied per strategy, costmodel.step)."""
    cluster = replace(cluster, runtime=runtime)
    device = replace(cluster.device, attention_cap=cluster.cost_runtime.attention_cap(cluster.device.arch))
    return replace(cluster, device=device)


def _load_cluster(text: str, profiles_dir: Path) -> Cluster:
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"cluster file {text} does not exist; give DEVICE:COUNT or a cluster YAML")
        return _cluster_from_yaml(_read_yaml(path), str(path), profiles_dir)
    device_name, sep, count_text = text.rpartition(":")
    if not sep or not device_name:
        raise ConfigError(f"--cluster '{text}' is neither DEVICE:COUNT (e.g. a100-80g:64) nor a .yaml file")
    try:
        count = int(count_text)
    except ValueError:
        raise ConfigError(f"--cluster '{text}': GPU count '{count_text}' is not an integer") from None
    if count < 1:
        raise ConfigError(f"--cluster '{text}': GPU count must be at least 1")
    data = load_profile_data(device_name, profiles_dir)
    per_node = int(data.get("gpus_per_node", 8))
    if count > per_node and count % per_node:
        raise ConfigError(
            f"--cluster '{text}': {count} GPUs do not fill nodes of {per_node}; use a multiple of {per_node} "
            "or a cluster YAML"
        )
    nodes, per_node = (count // per_node, per_node) if count >= per_node else (1, count)
    return _cluster(data, f"{device_name}:{count}", nodes, per_node, {})


def _cluster_from_yaml(data: dict, where: str, profiles_dir: Path) -> Cluster:
    unknown = sorted(set(data) - {"name", "nodes", "gpus_per_node", "device", "intra_node", "inter_node"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; a cluster has nodes, gpus_per_node, device, "
            "intra_node, inter_node"
        )
    if "device" not in data:
        raise ConfigError(f"{where}: field 'device' (a profile name or path) is missing")
    if not isinstance(data["device"], str):
        raise ConfigError(f"{where}: field 'device' must be a profile name or path, not {type(data['device']).__name__}")
    profile = load_profile_data(data["device"], profiles_dir)
    try:
        nodes = int(data.get("nodes", 1))
        per_node = int(data.get("gpus_per_node", profile.get("gpus_per_node", 8)))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: nodes and gpus_per_node must be integers") from None
    links = {k: data[k] for k in ("intra_node", "inter_node") if k in data}
    return _cluster(profile, str(data.get("name", Path(where).stem)), nodes, per_node, links)


def oversubscription(processes: int, host_cores: int | None) -> float:
    """How many processes take turns on each core (1 where the device is not a shared host)."""
    return max(1.0, processes / host_cores) if host_cores else 1.0


def _host_figure(profile: dict, key: str, default: float, low: float, high: float) -> float:
    """A number of a shared-host profile (after calibration is folded in), within [low, high]."""
    value = profile.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"profile {profile.get('name', 'profile')}: {key} must be a number in [{low:g}, {high:g}], "
                          f"got {value!r}")
    return float(value)


def _host_cores(profile: dict, name: str) -> int | None:
    cores = profile.get("host_cores")
    if cores is None:
        return None
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ConfigError(f"profile {name}: host_cores must be a positive integer, got {cores!r}")
    return cores


def _apply_calibration(profile: dict) -> dict:
    """Fold a profile's `calibration` (fitted by `paraplan profile` to measured training steps)
    into its figures: `compute` scales the peaks and memory bandwidth (what a step sustains of
    the microbenchmarks' rates), `latency_us` and `host_wait_us` replace the link latency and
    the host wait, `call_us` sets the links' cost per collective call (at one process per
    core; it grows with the oversubscription like the wait), `shared_compute` becomes the
    host's `host_shared_compute`."""
    cal = profile.get("calibration")
    if cal is None:
        return profile
    name = profile.get("name", "profile")
    if not isinstance(cal, dict):
        raise ConfigError(f"profile {name}: calibration must be a mapping of compute, latency_us, host_wait_us")
    try:
        compute = float(cal.get("compute", 1.0))
        latency = cal.get("latency_us")
        wait = cal.get("host_wait_us")
    except (TypeError, ValueError):
        raise ConfigError(f"profile {name}: calibration figures must be numbers") from None
    if not 0 < compute <= 1.5:
        raise ConfigError(f"profile {name}: calibration compute must be in (0, 1.5], got {compute}")
    out = _merge(profile, {})
    dev = dict(out.get("device", {}))
    if isinstance(dev.get("peak_tflops"), dict):
        dev["peak_tflops"] = {k: float(v) * compute for k, v in dev["peak_tflops"].items()}
    if "hbm_gb_per_s" in dev:
        dev["hbm_gb_per_s"] = float(dev["hbm_gb_per_s"]) * compute
    out["device"] = dev
    call = cal.get("call_us")
    if latency is not None or call is not None:
        links = dict(out.get("links", {}))
        for key in ("intra_node", "inter_node"):
            if isinstance(links.get(key), dict):
                links[key] = {**links[key], **({"latency_us": latency} if latency is not None else {}),
                              **({"call_us": call} if call is not None else {})}
        out["links"] = links
    if wait is not None:
        out["host_wait_us"] = wait
    if "shared_compute" in cal:
        out["host_shared_compute"] = cal["shared_compute"]
    return out


def _band(profile: dict) -> tuple[float, float] | None:
    band = profile.get("prediction_band")
    if band is None:
        return None
    try:
        low, high = (float(x) for x in band)
    except (TypeError, ValueError):
        raise ConfigError(f"profile {profile.get('name')}: prediction_band must be [low, high]") from None
    if not -1 < low <= high:
        raise ConfigError(f"profile {profile.get('name')}: prediction_band needs -1 < low <= high")
    return low, high


def _cluster(profile: dict, name: str, nodes: int, per_node: int, links: dict) -> Cluster:
    profile = _apply_calibration(profile)
    profile_links = profile.get("links", {})
    intra = links.get("intra_node", profile_links.get("intra_node"))
    inter = links.get("inter_node", profile_links.get("inter_node", intra))
    if not isinstance(intra, dict) or not isinstance(inter, dict):
        raise ConfigError(f"cluster {name}: intra_node and inter_node links must be mappings")
    device = device_from_data(profile)
    intra_link, inter_link = _link(intra, f"cluster {name} intra_node"), _link(inter, f"cluster {name} inter_node")
    cores = _host_cores(profile, str(profile.get("name", name)))
    if cores:
        slow = oversubscription(per_node, cores)
        share = 1 / slow  # of the one-thread figures each process gets
        if slow > 1:  # what time-slicing, cache sharing and the communication threads cost on top
            share *= _host_figure(profile, "host_shared_compute", 1.0, 1e-3, 1.5)
        device = replace(
            device,
            peak_tflops={k: v * share for k, v in device.peak_tflops.items()},
            hbm_gb_per_s=device.hbm_gb_per_s * share,
            hbm_gib=device.hbm_gib / per_node,
            layer_overhead_us=tuple(v * slow for v in device.layer_overhead_us),
            tp_layer_overhead_us=tuple(v * slow for v in device.tp_layer_overhead_us),
            fsdp_layer_overhead_us=tuple(v * slow for v in device.fsdp_layer_overhead_us),
            optimizer_overhead_us=tuple(v * slow for v in device.optimizer_overhead_us),
        )
        wait_us = _host_figure(profile, "host_wait_us", 0.0, 0.0, float("inf"))
        intra_link = replace(intra_link, latency_us=intra_link.latency_us + wait_us * (slow - 1),
                             bandwidth_gb_per_s=intra_link.bandwidth_gb_per_s / slow,
                             call_us=intra_link.call_us * slow)
    return Cluster(name=name, device=device, nodes=nodes, gpus_per_node=per_node, intra=intra_link, inter=inter_link,
                   host_cores=cores, profile=str(profile.get("name", name)), host_band=_band(profile))
