"""Adapter files, issue 22 items 16-20: hostile JSON, overflowing alpha/scale, header-first validation,
messages that do not quote the file, kohya files.

Every test makes the loader meet a file (or an argument) that the original loader mishandled and checks
the behaviour: an AdapterError with a useful message, no tensor data read before the header is checked,
the pipeline's weights bit-for-bit unchanged.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from unsee.adapters import Adapter, AdapterError, fingerprint, load_adapter, save_adapter  # noqa: E402
from unsee.pipelines import erasure as erasure_module  # noqa: E402
from unsee.testing import tiny_sd_pipeline  # noqa: E402

TO_K = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
DELTA_PARAMS = [("unet", "conv_in.weight"), ("unet", TO_K + ".weight"), ("text_encoder", "final_layer_norm.weight")]
LORA_MODULES = [("unet", "conv_in"), ("unet", TO_K), ("text_encoder", "encoder.layers.0.self_attn.q_proj")]
F32_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def snapshot(pipe):
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        out.update({f"{name}.{k}": v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()})
    return out


def assert_bit_identical(before, pipe):
    after = snapshot(pipe)
    assert set(after) == set(before)
    changed = [k for k in before if before[k].dtype != after[k].dtype
               or not torch.equal(before[k].reshape(-1).view(torch.uint8), after[k].reshape(-1).view(torch.uint8))]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


def assert_all_finite(pipe):
    bad = [k for k, v in snapshot(pipe).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    assert not bad, f"non-finite weights: {bad[:3]}"


def named_param(pipe, component, name):
    return dict(getattr(pipe, component).named_parameters())[name]


def make_delta(pipe, entries=DELTA_PARAMS, fill=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, name in entries:
        shape = named_param(pipe, component, name).shape
        if fill is not None:
            tensors[f"{component}.{name}"] = torch.full(shape, fill)
        else:
            tensors[f"{component}.{name}"] = torch.randn(shape, generator=g) * 0.1
    return Adapter(kind="delta", method="esd-u", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, sorted({c for c, _ in entries})), hyperparameters={"lr": 1e-5},
                   training={"steps": 3})


def make_lora(pipe, rank=2, alpha=3.0):
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for component, path in LORA_MODULES:
        weight = dict(getattr(pipe, component).named_modules())[path].weight
        a, b = ((rank, weight.shape[1]), (weight.shape[0], rank)) if weight.ndim == 2 else \
            ((rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1))
        tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(a, generator=g) * 0.3
        tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(b, generator=g) * 0.3
    return Adapter(kind="lora", method="spm", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, sorted({c for c, _ in LORA_MODULES})), rank=rank, alpha=alpha)


def header_metadata(path):
    with safetensors.safe_open(str(path), "pt") as handle:
        return handle.metadata()


def rewrite(path, tensors, metadata):
    """A safetensors file written directly, bypassing save_adapter's validation."""
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def with_metadata(pipe, folder, lora=False, **changes):
    good = save_adapter(make_lora(pipe) if lora else make_delta(pipe), folder / "good.safetensors")
    meta = {**header_metadata(good), **changes}
    return rewrite(folder / "edited.safetensors", safetensors.torch.load_file(str(good)), meta)


def write_raw(path, header: bytes, data_size: int):
    """A file with exactly this header and ``data_size`` data bytes (a sparse hole: nothing is written)."""
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + data_size)
    return path


def raw_header(metadata, entries):
    """safetensors header JSON for ``entries``: name -> (dtype, shape, nbytes), laid out in order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(header).encode(), offset


def assert_refused(pipe, path, *patterns):
    """load_adapter and load_erasure both raise AdapterError matching every pattern; the pipeline is untouched."""
    before = snapshot(pipe)
    for load in (load_adapter, pipe.load_erasure):
        with pytest.raises(AdapterError) as caught:
            load(path)
        for pattern in patterns:
            assert pattern in str(caught.value), f"{pattern!r} not in {str(caught.value)!r}"
        assert "\n" not in str(caught.value)
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# 16. hostile JSON: deep nesting, over-long integers
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 5000 + "]" * 5000  # beyond Python's recursion limit: json.loads raises RecursionError
LONG_INT = "9" * 5000  # beyond Python's 4300-digit int conversion limit: json.loads raises ValueError
NESTED_100 = "[" * 100 + "]" * 100  # parses, but deeper than any unsee header needs (and than a consumer may recurse)
PAYLOADS = {"deep": (DEEP, "nested too deeply"), "long int": (LONG_INT, "a number is too long"),
            "100 levels": (NESTED_100, "nested more than 64 levels")}
FIELDS = ["concepts", "fingerprint", "hyperparameters", "training"]


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("field", FIELDS)
def test_hostile_json_in_a_metadata_field_is_an_adapter_error(field, payload, tmp_path):
    pipe = tiny_sd_pipeline()
    value, problem = PAYLOADS[payload]
    text = f"[{value}]" if field == "concepts" else f'{{"unet": {value}}}'
    path = with_metadata(pipe, tmp_path, **{field: text})
    message = assert_refused(pipe, path, f"header entry '{field}' is not valid JSON", problem)
    assert len(message) < 400


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_json_in_the_lora_config_is_an_adapter_error(payload, tmp_path):
    pipe = tiny_sd_pipeline()
    value, problem = PAYLOADS[payload]
    path = with_metadata(pipe, tmp_path, lora=True,
                         lora_adapter_metadata=f'{{"unet.r": 2, "unet.lora_alpha": {value}, "text_encoder.r": 2}}')
    assert_refused(pipe, path, "header entry 'lora_adapter_metadata' is not valid JSON", problem)


@pytest.mark.parametrize("payload", ["deep", "long int"])
def test_hostile_json_in_the_safetensors_header_is_an_adapter_error(payload, tmp_path):
    pipe = tiny_sd_pipeline()
    good = save_adapter(make_delta(pipe, [("unet", "conv_in.weight")]), tmp_path / "good.safetensors")
    header, size = raw_header(header_metadata(good), {"unet.conv_in.weight": ("F32", (16, 4, 3, 3), 16 * 4 * 9 * 4)})
    value = DEEP if payload == "deep" else LONG_INT
    header = header[:-1] + b', "extra": ' + value.encode() + b"}"  # one more top-level entry, hostile
    path = write_raw(tmp_path / "hostile.safetensors", header, size)
    assert_refused(pipe, path, "is not a valid safetensors file", "not JSON")


# ---------------------------------------------------------------------------------------------
# 17. alpha and scale: nothing may overflow the weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["1e308", str(10 ** 400), "-1e39"], ids=["1e308", "10**400", "-1e39"])
def test_lora_alpha_beyond_float32_in_a_file_is_refused(alpha, tmp_path):
    pipe = tiny_sd_pipeline()
    lora_meta = json.dumps({"unet.r": 2, "unet.lora_alpha": 3.0, "text_encoder.r": 2, "text_encoder.lora_alpha": 3.0})
    lora_meta = lora_meta.replace("3.0", alpha)
    path = with_metadata(pipe, tmp_path, lora=True, lora_adapter_metadata=lora_meta)
    message = assert_refused(pipe, path, "alpha")
    assert len(message) < 400  # a 400-digit alpha is not quoted in full
    assert_all_finite(pipe)


@pytest.mark.parametrize("alpha", [1e308, 10 ** 400, -1e39], ids=["1e308", "10**400", "-1e39"])
def test_lora_alpha_beyond_float32_in_memory_is_refused(alpha):
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    with pytest.raises(AdapterError, match="alpha"):
        pipe.load_erasure(make_lora(pipe, alpha=alpha))
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)


@pytest.mark.parametrize("scale", [1e39, -3.5e38, 10 ** 400, -(10 ** 400), torch.tensor(1e300, dtype=torch.float64)],
                         ids=["1e39", "-3.5e38", "10**400", "-10**400", "float64 tensor 1e300"])
def test_scale_beyond_float32_is_refused(scale):
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    with pytest.raises(AdapterError, match="scale") as caught:
        pipe.load_erasure(make_delta(pipe), scale=scale)
    assert len(str(caught.value)) < 300
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)

    name = pipe.load_erasure(make_delta(pipe), scale=0.5)
    loaded = snapshot(pipe)
    with pytest.raises(AdapterError, match="scale"):
        pipe.set_erasure_scale(name, scale)
    assert pipe.active_erasures == {name: 0.5}
    assert_bit_identical(loaded, pipe)


def test_merge_that_overflows_float32_is_refused():
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    big = make_delta(pipe, fill=2.0)
    with pytest.raises(AdapterError, match="overflow"):
        pipe.load_erasure(big, scale=3e38)  # a finite scale within float32's range; 6e38 is not
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)

    name = pipe.load_erasure(big, scale=1.0)
    loaded = snapshot(pipe)
    with pytest.raises(AdapterError, match="overflow"):
        pipe.set_erasure_scale(name, 3e38)
    assert pipe.active_erasures == {name: 1.0}
    assert_bit_identical(loaded, pipe)
    pipe.unload_erasure()
    assert_bit_identical(before, pipe)


def test_stacked_adapters_that_overflow_together_are_refused():
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    pipe.load_erasure(make_delta(pipe, fill=1.0), scale=2e38, adapter_name="first")  # finite alone
    with_first = snapshot(pipe)
    assert_all_finite(pipe)
    with pytest.raises(AdapterError, match="overflow"):
        pipe.load_erasure(make_delta(pipe, fill=1.0), scale=2e38, adapter_name="second")  # 4e38 together
    assert pipe.active_erasures == {"first": 2e38}
    assert_bit_identical(with_first, pipe)
    pipe.unload_erasure()
    assert_bit_identical(before, pipe)


def test_half_precision_overflow_is_refused():
    pipe = tiny_sd_pipeline().to(dtype=torch.float16)
    before = snapshot(pipe)
    with pytest.raises(AdapterError, match="overflow"):
        pipe.load_erasure(make_delta(pipe, fill=1.0), scale=1e5)  # fine in float32, beyond float16's 65504
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)
    pipe.load_erasure(make_delta(pipe, fill=1.0), scale=1e3)  # in range: applies
    assert_all_finite(pipe)


def test_unload_that_fails_midway_keeps_the_adapters(monkeypatch):
    # both merged (a LoRA erasure adapter is a peft adapter: unloading it recomputes no weight)
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(make_delta(pipe, seed=1), scale=0.5, adapter_name="first")
    pipe.load_erasure(make_delta(pipe, seed=2), adapter_name="second")
    loaded = snapshot(pipe)
    real, calls = erasure_module._Term.value, {"n": 0}

    def fails_once(self, *args, **kwargs):
        calls["n"] += 1
        # per parameter: what was written last (first + second: 2 calls), then the new value (first: 1 call);
        # call 5 comes after the first parameter was written
        if calls["n"] == 5:
            raise AdapterError("simulated overflow")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(erasure_module._Term, "value", fails_once)
    with pytest.raises(AdapterError, match="simulated"):
        pipe.unload_erasure("second")
    assert pipe.active_erasures == {"first": 0.5, "second": 1.0}
    assert_bit_identical(loaded, pipe)


# ---------------------------------------------------------------------------------------------
# 18. the header is checked (against the model too) before any tensor data is read
# ---------------------------------------------------------------------------------------------


class _SpyHandle:
    def __init__(self, handle, reads):
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name):
        self._reads.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name):
        return _SpySlice(self._handle.get_slice(name), name, self._reads)

    def __getattr__(self, attr):  # keys, metadata, offset_keys, ...
        return getattr(self._handle, attr)


class _SpySlice:
    def __init__(self, entry, name, reads):
        self._entry, self._name, self._reads = entry, name, reads

    def __getitem__(self, index):
        self._reads.append(self._name)
        return self._entry[index]

    def __getattr__(self, attr):  # get_shape, get_dtype
        return getattr(self._entry, attr)


@pytest.fixture
def tensor_reads(monkeypatch):
    """Names of the tensors whose data safetensors reads (every way unsee could read them)."""
    reads = []
    real_open, real_load_file, real_load = safetensors.safe_open, safetensors.torch.load_file, safetensors.torch.load

    def spy_open(*args, **kwargs):
        return _SpyHandle(real_open(*args, **kwargs), reads)

    def spy_load_file(filename, *args, **kwargs):
        tensors = real_load_file(filename, *args, **kwargs)
        reads.extend(tensors)
        return tensors

    def spy_load(data, *args, **kwargs):
        tensors = real_load(data, *args, **kwargs)
        reads.extend(tensors)
        return tensors

    monkeypatch.setattr(safetensors, "safe_open", spy_open)
    monkeypatch.setattr(safetensors.torch, "load_file", spy_load_file)
    monkeypatch.setattr(safetensors.torch, "load", spy_load)
    return reads


def _big_wrong_shape(pipe, folder):
    """A delta file whose one tensor claims 64 MiB (a sparse hole) in a shape conv_in does not have."""
    good = save_adapter(make_delta(pipe, [("unet", "conv_in.weight")]), folder / "good.safetensors")
    header, size = raw_header(header_metadata(good), {"unet.conv_in.weight": ("F32", (4096, 4096), 4096 * 4096 * 4)})
    return write_raw(folder / "big.safetensors", header, size)


def test_wrong_shape_is_found_from_the_header_before_reading(tensor_reads, tmp_path):
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    path = _big_wrong_shape(pipe, tmp_path)
    assert path.stat().st_size > 64 * 2 ** 20
    with pytest.raises(AdapterError, match=r"has shape \(4096, 4096\), but unet.conv_in.weight has shape"):
        pipe.load_erasure(path)
    assert tensor_reads == []
    with pytest.raises(AdapterError, match=r"has shape \(4096, 4096\)"):
        load_adapter(path, pipe=pipe)
    assert tensor_reads == []
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)


def _lora_rank_mismatch(pipe, folder):
    good = save_adapter(make_lora(pipe), folder / "lora.safetensors")
    tensors = safetensors.torch.load_file(str(good))
    key = f"unet.{TO_K}.lora_A.weight"
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    return rewrite(folder / "rank.safetensors", tensors, header_metadata(good))


def _integer_tensor(pipe, folder):
    good = save_adapter(make_delta(pipe), folder / "good.safetensors")
    tensors = safetensors.torch.load_file(str(good))
    tensors["unet.conv_in.weight"] = tensors["unet.conv_in.weight"].to(torch.int32)
    return rewrite(folder / "int.safetensors", tensors, header_metadata(good))


def _other_model(pipe, folder):
    good = save_adapter(make_delta(pipe), folder / "good.safetensors")
    meta = {**header_metadata(good), "fingerprint": json.dumps({"unet": "0" * 16, "text_encoder": "1" * 16})}
    return rewrite(folder / "other.safetensors", safetensors.torch.load_file(str(good)), meta)


HEADER_PROBLEMS = {
    "lora rank mismatch": (_lora_rank_mismatch, "rank mismatch", True),
    "integer tensor": (_integer_tensor, "floating point", True),
    "another architecture": (_other_model, "trained for another architecture", False),
}


@pytest.mark.parametrize("case", list(HEADER_PROBLEMS))
def test_header_problems_are_found_before_reading(case, tensor_reads, tmp_path):
    build, message, without_pipe = HEADER_PROBLEMS[case]
    pipe = tiny_sd_pipeline()
    path = build(pipe, tmp_path)
    tensor_reads.clear()
    with pytest.raises(AdapterError, match=message):
        pipe.load_erasure(path)
    assert tensor_reads == []
    if without_pipe:  # found from the header alone, by load_adapter without a pipeline
        with pytest.raises(AdapterError, match=message):
            load_adapter(path)
        assert tensor_reads == []


def test_a_good_file_is_read_once_after_the_header(tensor_reads, tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = make_delta(pipe)
    path = save_adapter(adapter, tmp_path / "good.safetensors")
    tensor_reads.clear()
    pipe.load_erasure(path)
    assert sorted(tensor_reads) == sorted(adapter.tensors)  # each tensor read exactly once
    expected = named_param(pipe, "unet", "conv_in.weight").detach().clone()
    pipe.unload_erasure()
    assert torch.equal(named_param(pipe, "unet", "conv_in.weight") + adapter.tensors["unet.conv_in.weight"], expected)


# ---------------------------------------------------------------------------------------------
# 19. messages never quote the file's contents
# ---------------------------------------------------------------------------------------------

PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n" * 4


def test_symlink_to_another_file_does_not_leak_its_bytes(tmp_path):
    target = tmp_path / "passwd"
    target.write_bytes(PASSWD)
    link = tmp_path / "adapter.safetensors"
    link.symlink_to(target)
    pipe = tiny_sd_pipeline()
    message = assert_refused(pipe, link, "safetensors file").replace(str(link), "<path>")
    (as_number,) = struct.unpack("<Q", PASSWD[:8])
    for secret in (str(as_number), hex(as_number), "root", "daemon", "bash", "nologin"):
        assert secret not in message


def test_json_header_of_another_kind_does_not_leak(tmp_path):
    path = write_raw(tmp_path / "config.safetensors", json.dumps({"api_token": "hunter2-secret"}).encode(), 0)
    message = assert_refused(tiny_sd_pipeline(), path, "is not a valid safetensors file").replace(str(path), "")
    assert "api_token" not in message and "hunter2" not in message


def test_unknown_dtype_name_is_not_quoted(tmp_path):
    pipe = tiny_sd_pipeline()
    good = save_adapter(make_delta(pipe, [("unet", "conv_in.weight")]), tmp_path / "good.safetensors")
    header, size = raw_header(header_metadata(good), {"unet.conv_in.weight": ("HUNTER2", (16, 4, 3, 3), 576 * 4)})
    path = write_raw(tmp_path / "dtype.safetensors", header, size)
    message = assert_refused(pipe, path, "safetensors file").replace(str(path), "")
    assert "HUNTER2" not in message


def test_truncated_file_message_quotes_no_header_numbers(tmp_path):
    pipe = tiny_sd_pipeline()
    good = save_adapter(make_delta(pipe), tmp_path / "good.safetensors")
    data = good.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:-100])
    message = assert_refused(pipe, path, "truncated").replace(str(path), "")
    (header_len,) = struct.unpack("<Q", data[:8])
    assert str(len(data) - 8 - header_len) not in message and str(len(data)) not in message
    assert str(len(data) - 100) in message  # the file's own size is not its content


# ---------------------------------------------------------------------------------------------
# 20. kohya/A1111 LoRA files get the right hint
# ---------------------------------------------------------------------------------------------

KOHYA = {
    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
    "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
    "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2),
    "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0),
}


def test_kohya_file_is_read_and_an_adapter_with_kohya_keys_gets_the_hint(tmp_path):
    """Since issue 26 unsee reads kohya files (tests/test_lora_export.py); a kohya file whose shapes do not fit the
    pipeline is refused before anything changes, and an in-memory Adapter with kohya keys gets the conversion hint."""
    path = rewrite(tmp_path / "kohya.safetensors", KOHYA, {"ss_network_module": "networks.lora", "ss_network_dim": "2"})
    assert load_adapter(path).method == "unknown"
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    with pytest.raises(AdapterError, match="fc1"):  # a 32-wide fc1 does not fit the tiny text encoder
        pipe.load_erasure(path)
    assert pipe.active_erasures == {}
    assert_bit_identical(before, pipe)
    adapter = make_lora(pipe)
    adapter.tensors = dict(KOHYA)
    with pytest.raises(AdapterError) as caught:
        pipe.load_erasure(adapter)
    assert "kohya" in str(caught.value) and "from_kohya" in str(caught.value) and "load_erasure(path)" in str(caught.value)


def test_diffusers_lora_still_gets_the_diffusers_hint(tmp_path):
    pipe = tiny_sd_pipeline()
    path = rewrite(tmp_path / "plain.safetensors", make_lora(pipe).tensors, {"format": "pt"})
    message = assert_refused(pipe, path, "plain diffusers LoRA", "pipe.load_lora_weights")
    assert "kohya" not in message
