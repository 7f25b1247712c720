"""kft.augment: flag parsing, XLA compilation of every op, and each op's mechanics.

Every augmented batch here comes out of `tf.function(jit_compile=True)`, which on CPU really
compiles with XLA, so an op without an XLA kernel fails these tests.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kft import augment

H = W = 16
B = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(batch: int = B, seed: int = 0):
    """uint8-derived RGB images as float32 and one distinct one-hot class per example."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, H, W, 3), dtype=np.uint8).astype(np.float32)
    return images, np.eye(batch, dtype=np.float32)


def _compiled(augmenter):
    return tf.function(lambda x, y: augmenter(x, y), jit_compile=True)


def _run(ops, seed=0, calls=1, batch=B, **kwargs):
    """Runs a fresh Augmenter `calls` times under XLA; returns the inputs and a list of outputs."""
    x, y = _batch(batch)
    step = _compiled(augment.Augmenter(ops, seed=seed, **kwargs))
    outs = []
    for _ in range(calls):
        xo, yo = step(tf.constant(x), tf.constant(y))
        outs.append((xo.numpy(), yo.numpy()))
    return x, y, outs


def _partners(y_in, y_out):
    """Each example's label weight on itself and the example it was mixed with (labels are eye)."""
    own = np.diagonal(y_out).copy()
    others = y_out * (1 - y_in)
    return own, others.argmax(axis=1)


# ---------------------------------------------------------------------------------------------
# parse


def test_parse_returns_canonical_order_and_accepts_aliases():
    assert augment.parse("mixup,flip,crop") == ("crop", "flip", "mixup")
    assert augment.parse(" Flip , color ") == ("flip", "colour")
    assert augment.parse("cutmix,colour,translate,mixup,rot90,flip,crop,rotate") == augment.OPS
    assert augment.parse("") == ()
    assert augment.parse("none") == ()
    assert augment.parse("crop,") == ("crop",)


def test_parse_errors_name_the_bad_value_and_the_choices():
    with pytest.raises(ValueError) as e:
        augment.parse("crop,rotation")
    assert str(e.value) == (
        "unknown augmentation 'rotation' in --augment; choose from: "
        "rotate, crop, flip, rot90, translate, colour, mixup, cutmix"
    )
    with pytest.raises(ValueError, match="'flip' is named twice"):
        augment.parse("flip,crop,flip")
    with pytest.raises(ValueError, match="'colour' is named twice"):
        augment.parse("color,colour")
    with pytest.raises(ValueError, match="combines 'none'"):
        augment.parse("none,flip")
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        augment.Augmenter(("flip", "blur"), seed=0)


# ---------------------------------------------------------------------------------------------
# Every op alone and all together, compiled with XLA


# How many of the B examples must change: flip leaves about half of them as they are, rot90 a
# quarter.
_MIN_CHANGED = {"flip": 2, "rot90": 2}


@pytest.mark.parametrize("ops", [(op,) for op in augment.OPS] + [augment.OPS], ids=lambda ops: "+".join(ops))
def test_op_compiles_with_xla_and_keeps_shapes_ranges_and_labels(ops):
    x, y, [(xo, yo)] = _run(ops)
    assert xo.shape == x.shape and xo.dtype == np.float32
    assert yo.shape == y.shape and yo.dtype == np.float32
    assert xo.min() >= 0.0 and xo.max() <= 255.0
    np.testing.assert_allclose(yo.sum(axis=1), 1.0, atol=1e-5)
    assert (yo >= 0).all()
    changed = np.abs(xo - x).reshape(B, -1).max(axis=1) > 1e-3
    assert changed.sum() >= _MIN_CHANGED.get(ops[0] if len(ops) == 1 else "", B - 1), changed
    if "mixup" not in ops and "cutmix" not in ops:
        np.testing.assert_array_equal(yo, y)


def test_unknown_batch_size_compiles():
    augmenter = augment.Augmenter(augment.OPS, seed=0)
    step = tf.function(
        lambda x, y: augmenter(x, y),
        jit_compile=True,
        input_signature=[tf.TensorSpec([None, H, W, 3], tf.float32), tf.TensorSpec([None, B], tf.float32)],
    )
    for batch in (B, 3, 1):
        x, y = _batch(B)
        xo, yo = step(x[:batch], y[:batch])
        assert xo.shape == (batch, H, W, 3) and yo.shape == (batch, B)
        np.testing.assert_allclose(yo.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_no_ops_is_an_identity_that_draws_nothing():
    augmenter = augment.Augmenter((), seed=0)
    x, y = (tf.constant(a) for a in _batch())
    xo, yo = augmenter(x, y)
    assert xo is x and yo is y
    np.testing.assert_array_equal(augmenter.seed_generator.state.numpy(), [0, 0])


# ---------------------------------------------------------------------------------------------
# Mechanics: what each op does to the pixels and labels


def test_flip_gives_the_image_or_its_mirror():
    x, _, outs = _run(("flip",), calls=4)
    flipped = []
    for xo, _ in outs:
        for i in range(B):
            same, mirror = np.array_equal(xo[i], x[i]), np.array_equal(xo[i], x[i, :, ::-1])
            assert same != mirror
            flipped.append(mirror)
    assert 0 < sum(flipped) < len(flipped)


def test_rot90_gives_the_image_turned_by_a_multiple_of_a_quarter():
    x, _, outs = _run(("rot90",), calls=4)
    turns = []
    for xo, _ in outs:
        for i in range(B):
            found = [k for k in range(4) if np.array_equal(xo[i], np.rot90(x[i], k))]
            assert len(found) == 1, f"output {i} is not one rotation of its input"
            turns.append(found[0])
    assert set(turns) == {0, 1, 2, 3}


def test_rot90_refuses_images_that_are_not_square():
    augmenter = augment.Augmenter(("rot90",), seed=0)
    with pytest.raises(ValueError, match="rot90 augmentation needs square images, got 16x8"):
        augmenter(tf.zeros([2, 16, 8, 3]), tf.one_hot([0, 1], 2))


def test_rotate_turns_about_the_centre_by_a_quarter_at_the_extremes_of_90_degrees():
    x, _ = _batch(3)
    turned = augment._rotate(tf.constant(x), tf.constant([0.5, 1.0, 0.0]), 90.0).numpy()
    np.testing.assert_allclose(turned[0], x[0], atol=1e-3)  # the middle of the range: no turn
    np.testing.assert_allclose(turned[1], np.rot90(x[1], 3), atol=1e-3)  # +90 degrees
    np.testing.assert_allclose(turned[2], np.rot90(x[2], 1), atol=1e-3)  # -90 degrees


def test_rotate_stays_within_its_angle_and_fills_corners_by_reflection():
    # A bright dot 6 pixels right of the centre: its centroid's angle is the turn's angle.
    size = 33
    dot = np.zeros((B, size, size, 3), np.float32)
    dot[:, 16, 21:24] = 255.0
    augmenter = augment.Augmenter(("rotate",), seed=0, rotate_degrees=15.0)
    step = _compiled(augmenter)
    angles = []
    for _ in range(4):
        xo, _ = step(tf.constant(dot), tf.constant(np.eye(B, dtype=np.float32)))
        mass = xo.numpy()[..., 0]
        rows, cols = np.mgrid[0:size, 0:size]
        cy = (mass * rows).sum(axis=(1, 2)) / mass.sum(axis=(1, 2))
        cx = (mass * cols).sum(axis=(1, 2)) / mass.sum(axis=(1, 2))
        angles.extend(np.degrees(np.arctan2(cy - 16, cx - 16)))
    assert max(abs(a) for a in angles) <= 15.5, angles
    assert min(angles) < -5 and max(angles) > 5, angles  # both ways, not only tiny turns
    flat = np.full((2, H, W, 3), 200.0, np.float32)  # reflection, not zeros, fills the corners
    np.testing.assert_allclose(augment._rotate(tf.constant(flat), tf.constant([0.0, 1.0]), 30.0), flat, atol=1e-3)


def test_crop_flip_rot90_compose_into_one_map():
    # rot90(flip(crop(x))) for some crop window, flip and number of quarter turns.
    x, _, [(xo, _)] = _run(("crop", "flip", "rot90"), calls=1)
    reflect = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for i in range(B):
        crops = [reflect[i, cy : cy + H, cx : cx + W] for cy in range(5) for cx in range(5)]
        candidates = [np.rot90(flipped, k) for crop in crops for flipped in (crop, crop[:, ::-1]) for k in range(4)]
        assert any(np.array_equal(xo[i], c) for c in candidates), f"output {i} is not rot90(flip(crop(x)))"


def _window_offsets(x, outs, pad, mode):
    """The (dy, dx) window of the padded input each output is; fails if one is no window."""
    padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode=mode)
    offsets = []
    for xo, _ in outs:
        for i in range(len(x)):
            found = [
                (dy, dx)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                if np.array_equal(xo[i], padded[i, dy : dy + H, dx : dx + W])
            ]
            assert found, f"output {i} is not a {H}x{W} window of the {mode}-padded input"
            offsets.append(found[0])
    return offsets


def test_crop_is_a_window_of_the_reflect_padded_image():
    x, _, outs = _run(("crop",), calls=3, crop_padding=0.125)
    offsets = _window_offsets(x, outs, pad=2, mode="reflect")  # 0.125 * 16
    assert len(set(offsets)) > 8  # per-example offsets, not one per batch


def test_translate_is_a_window_of_the_zero_padded_image():
    x, _, outs = _run(("translate",), calls=3, translate_fraction=0.1)
    offsets = _window_offsets(x, outs, pad=2, mode="constant")  # round(0.1 * 16)
    assert len(set(offsets)) > 8


def test_crop_flip_translate_compose_into_one_map():
    # All three run as one gather; each output must still be translate(flip(crop(x))).
    x, _, [(xo, _)] = _run(("crop", "flip", "translate"), calls=1)
    reflect = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for i in range(B):
        candidates = []
        for cy in range(5):
            for cx in range(5):
                crop = reflect[i, cy : cy + H, cx : cx + W]
                for flipped in (crop, crop[:, ::-1]):
                    zero = np.pad(flipped, [(2, 2), (2, 2), (0, 0)])
                    candidates += [zero[ty : ty + H, tx : tx + W] for ty in range(5) for tx in range(5)]
        assert any(np.array_equal(xo[i], c) for c in candidates), f"output {i} is not translate(flip(crop(x)))"


def test_colour_keeps_grey_grey_and_jitters_per_example():
    grey = np.repeat(np.linspace(20, 230, B * H * W, dtype=np.float32).reshape(B, H, W, 1), 3, axis=3)
    step = _compiled(augment.Augmenter(("colour",), seed=0))
    xo = step(tf.constant(grey), tf.constant(np.eye(B, dtype=np.float32)))[0].numpy()
    # Saturation and hue act on chroma only, so a grey pixel stays grey.
    np.testing.assert_allclose(xo[..., 0], xo[..., 1], atol=1e-2)
    np.testing.assert_allclose(xo[..., 0], xo[..., 2], atol=1e-2)
    # Brightness and contrast are drawn per example: the ratio out/in differs between examples.
    gain = xo[:, H // 2, W // 2, 0] / grey[:, H // 2, W // 2, 0]
    assert len(np.unique(np.round(gain, 4))) == B


def _check_partner_permutation(partner):
    assert (partner != np.arange(len(partner))).all(), "an example was mixed with itself"
    assert sorted(partner) == list(range(len(partner))), "partners are not a permutation"


def test_mixup_is_the_convex_combination_its_labels_say():
    x, y, outs = _run(("mixup",), calls=3)
    for xo, yo in outs:
        lam, partner = _partners(y, yo)
        _check_partner_permutation(partner)
        np.testing.assert_allclose(yo[np.arange(B), partner], 1 - lam, atol=1e-6)
        expected = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
        np.testing.assert_allclose(xo, expected, atol=1e-3)
        assert ((lam > 1e-3) & (lam < 1 - 1e-3)).any()


def _cutmix_fraction(x, xo, i, p):
    """Fraction of example i's pixels that came from p; fails unless each is i's or p's and
    those from p form one rectangle."""
    own = (xo[i] == x[i]).all(axis=-1)
    pasted = (xo[i] == x[p]).all(axis=-1) & ~own
    assert (own | pasted).all(), f"example {i} has pixels from neither itself nor its partner {p}"
    if pasted.any():
        rows, cols = np.nonzero(pasted.any(axis=1))[0], np.nonzero(pasted.any(axis=0))[0]
        assert pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all(), "the pasted region is not a box"
    return pasted.mean()


def test_cutmix_label_weights_are_the_pasted_area():
    x, y, outs = _run(("cutmix",), calls=3)
    pasted_any = False
    for xo, yo in outs:
        own, partner = _partners(y, yo)
        _check_partner_permutation(partner)
        for i in range(B):
            fraction = _cutmix_fraction(x, xo, i, partner[i])
            np.testing.assert_allclose(yo[i, partner[i]], fraction, atol=1e-6)
            np.testing.assert_allclose(own[i], 1 - fraction, atol=1e-6)
            pasted_any |= 0 < fraction < 1
    assert pasted_any


def test_mixup_and_cutmix_together_apply_one_per_batch():
    x, y, outs = _run(("mixup", "cutmix"), calls=8)
    kinds = []
    for xo, yo in outs:
        lam, partner = _partners(y, yo)
        is_cutmix = all(np.isin(xo[i], np.stack([x[i], x[partner[i]]])).all() for i in range(B))
        if is_cutmix:
            for i in range(B):
                np.testing.assert_allclose(yo[i, partner[i]], _cutmix_fraction(x, xo, i, partner[i]), atol=1e-6)
        else:
            expected = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
            np.testing.assert_allclose(xo, expected, atol=1e-3)
        kinds.append(is_cutmix)
    assert 0 < sum(kinds) < len(kinds), kinds


def test_beta_sampler_matches_the_distribution():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    noise = tf.constant(rng.random((2 * augment._GAMMA_ROWS, 20000), dtype=np.float32))
    for alpha in (0.2, 1.0):
        # The gammas themselves (near 1, Beta samples round to exactly 1.0 in float32, which
        # a KS test of the Beta would flag although the sampler is right).
        gamma = np.exp(augment._log_gamma(noise[: augment._GAMMA_ROWS], alpha).numpy().astype(np.float64))
        assert stats.kstest(gamma, stats.gamma(alpha).cdf).pvalue > 1e-3
        lam = augment._beta(noise, alpha).numpy().astype(np.float64)
        assert abs(lam.mean() - 0.5) < 0.01
        assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.005
    assert stats.kstest(lam, stats.beta(1.0, 1.0).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Seeding and state


def test_same_seed_same_output_different_seed_different_output():
    _, _, first = _run(augment.OPS, seed=3, calls=2)
    _, _, again = _run(augment.OPS, seed=3, calls=2)
    _, _, other = _run(augment.OPS, seed=4, calls=2)
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert not np.allclose(first[0][0], other[0][0])
    assert not np.allclose(first[0][0], first[1][0])  # each call draws afresh


class _Holder(keras.Model):
    """A model owning an augmenter, as kft's FineTuner does."""

    def __init__(self, seed):
        super().__init__()
        self.dense = keras.layers.Dense(2)
        self.augmenter = augment.Augmenter(("crop", "flip", "mixup"), seed=seed)

    def call(self, x):
        return self.dense(x)


def test_rng_state_is_saved_with_the_model_weights_and_resumes(tmp_path):
    x, y = (tf.constant(a) for a in _batch())
    trained = _Holder(seed=5)
    trained(tf.zeros([1, 4]))
    trained.augmenter(x, y)
    trained.augmenter(x, y)
    assert [v.path for v in trained.augmenter.variables] == [trained.augmenter.seed_generator.state.path]
    np.testing.assert_array_equal(trained.augmenter.seed_generator.state.numpy(), [5, 2])
    path = str(tmp_path / "model.weights.h5")
    trained.save_weights(path)
    resumed = _Holder(seed=5)
    resumed(tf.zeros([1, 4]))
    resumed.load_weights(path)
    np.testing.assert_array_equal(resumed.augmenter.seed_generator.state.numpy(), [5, 2])
    np.testing.assert_array_equal(trained.augmenter(x, y)[0].numpy(), resumed.augmenter(x, y)[0].numpy())


def test_get_config_round_trips():
    augmenter = augment.Augmenter(
        ("cutmix", "crop", "rotate"), seed=7, mixup_alpha=0.4, translate_fraction=0.2, rotate_degrees=10.0
    )
    config = augmenter.get_config()
    assert config["ops"] == ["rotate", "crop", "cutmix"] and config["seed"] == 7
    clone = augment.Augmenter.from_config(config)
    assert clone.ops == augmenter.ops and clone.mixup_alpha == 0.4 and clone.translate_fraction == 0.2
    assert clone.rotate_degrees == 10.0
    x, y = (tf.constant(a) for a in _batch())
    np.testing.assert_array_equal(augmenter(x, y)[0].numpy(), clone(x, y)[0].numpy())


def test_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        augmenter = augment.Augmenter(("mixup",), seed=0)
        xo, yo = augmenter(*(tf.constant(a) for a in _batch()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert xo.dtype == tf.float32 and yo.dtype == tf.float32


# ---------------------------------------------------------------------------------------------
# MirroredStrategy: logical devices must be set before TensorFlow starts, so in a subprocess.

_MIRRORED = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kft import augment

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 16, 16, 3)).astype(np.float32)
    x[4:] = x[:4]  # both replicas get the same four images
    y = np.eye(8, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        augmenter = augment.Augmenter(augment.OPS, seed=11)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)).unbatch().batch(8))
    batch = next(iter(dataset))

    # jit_compile stays off here: XLA inside strategy.run on *logical* CPU devices cannot read a
    # variable placed on the other device (a TF limitation, not kft's; real GPUs are fine).
    @tf.function
    def step(batch):
        return strategy.run(lambda b: augmenter(*b), args=(batch,))

    images, labels = step(batch)
    images, labels = step(batch)
    local_x = [t.numpy() for t in strategy.experimental_local_results(images)]
    local_y = [t.numpy() for t in strategy.experimental_local_results(labels)]
    state = [v.numpy().tolist() for v in augmenter.seed_generator.state.value.values]  # per replica

    # On its second call replica r of 2 draws with the seed (11, 1 * 2 + r); a single-device
    # augmenter whose state is set to that seed must produce the same batch.
    single = augment.Augmenter(augment.OPS, seed=11)
    like_replica = []
    for r in range(2):
        single.seed_generator.state.assign([11, 2 + r])
        like_replica.append(single(x[:4], y[:4])[0].numpy())
    print(json.dumps({
        "shapes": [list(a.shape) for a in local_x],
        "in_range": all(a.min() >= 0 and a.max() <= 255 for a in local_x),
        "label_sums_ok": all(bool(np.allclose(a.sum(1), 1, atol=1e-5)) for a in local_y),
        "replicas_differ": not np.allclose(local_x[0], local_x[1]),
        "replicas_match_seed_scheme": [bool(np.allclose(a, b, atol=1e-3)) for a, b in zip(local_x, like_replica)],
        "state": state,
    }))
    """
)


def test_mirrored_strategy_replicas_draw_independently():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[4, 16, 16, 3], [4, 16, 16, 3]]
    assert result["in_range"] and result["label_sums_ok"]
    assert result["replicas_differ"]
    assert result["replicas_match_seed_scheme"] == [True, True]
    assert result["state"] == [[11, 2], [11, 2]]
