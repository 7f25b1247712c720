"""Batch augmentation that runs inside the compiled train step.

tf.data hands the device uint8 batches; `FineTuner.train_step` casts them to float32 (0..255,
RGB), one-hot encodes the labels and calls `Augmenter(images, labels)`. With
`--jit_compile` the step is XLA-compiled, so every op here must have an XLA kernel and
shapes may not depend on data. What that rules out (checked with TF 2.21, Keras 3.15,
`tf.function(jit_compile=True)` on CPU):

- ImageProjectiveTransform (behind RandomTranslation/Rotation/Zoom, tensorflow#55194): crop,
  flip and translate compose into one per-example index map, read with batched `tf.gather`;
  rotate reads its bilinear neighbours with four such gathers.
- StatelessRandomGamma (so also `keras.random.gamma` and `keras.random.beta`): mixup and
  cutmix draw Beta(alpha, alpha) from two Marsaglia-Tsang gammas built from uniform noise.
  (Inverting `tf.math.betainc` by bisection compiles, but took 4 s to compile on CPU.)
- StatelessShuffle: the mixing partner comes from an argsort of uniform noise.
- Dynamic slicing for the cutmix box: the box is a mask built from iota comparisons.

Randomness: one `keras.random.SeedGenerator` (seeded by `--seed`; its state is saved with the
model's weights, so a resumed run continues the sequence) yields one seed per call, and one stateless uniform draw on that seed gives all the noise the
batch needs. The replica id is mixed into the seed, so MirroredStrategy replicas augment their
slices of the batch independently.
"""

import itertools
import math

import keras
import numpy as np
import tensorflow as tf

OPS = ("rotate", "crop", "flip", "rot90", "translate", "colour", "mixup", "cutmix")
_ALIASES = {"color": "colour"}

# Colour jitter, modest: brightness, contrast and saturation factors in [1 - s, 1 + s] (timm's
# default colour jitter of 0.4, halved), hue shifted by up to h of a full turn either way.
BRIGHTNESS = 0.2
CONTRAST = 0.2
SATURATION = 0.2
HUE = 0.05

# rotate turns each image by an angle uniform in [-ROTATE_DEGREES, ROTATE_DEGREES]: a camera
# held a little askew. (Keras's transfer-learning guide uses RandomRotation(0.1), up to 36
# degrees, whose empty corners it fills with reflections too.)
ROTATE_DEGREES = 15.0

# How often a batch gets cutmix rather than mixup when both are on (timm's switch_prob).
CUTMIX_PROBABILITY = 0.5

# RGB -> YIQ (rows Y, I, Q). Saturation scales (I, Q) and hue rotates them; Y is luma.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.59590059, -0.27455667, -0.32134392], [0.21153661, -0.52273617, 0.31119955]],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_LUMA = _RGB_TO_YIQ[0]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown augmentation '{name}' in --augment; choose from: {', '.join(OPS)}")


def _canonical(names) -> tuple[str, ...]:
    seen = []
    for raw in names:
        name = _ALIASES.get(raw, raw)
        if name not in OPS:
            raise _unknown(raw)
        if name in seen:
            raise ValueError(f"augmentation '{name}' is named twice in --augment")
        seen.append(name)
    return tuple(op for op in OPS if op in seen)


def parse(spec: str) -> tuple[str, ...]:
    """Parses the --augment flag.

    Args:
      spec: comma-separated op names from OPS ("color" is accepted for "colour"); "" or
        "none" for no augmentation. Case and spaces are ignored.

    Returns:
      The ops in the canonical order of OPS, the order they are applied in.

    Raises:
      ValueError: on an unknown or repeated name, naming it and the allowed ones.
    """
    names = [part.strip().lower() for part in spec.split(",")]
    names = [name for name in names if name]
    if names == ["none"]:
        return ()
    if "none" in names:
        raise ValueError(f"--augment={spec!r} combines 'none' with other augmentations; use one or the other")
    return _canonical(names)


# Uniform noise is drawn once per batch as a [rows, batch] table, one row per random quantity
# (a number per example); each op reads its own fixed rows, so turning one op on or off does
# not change what another draws. One RNG call instead of one per quantity: under XLA every
# stateless RNG op and seed fold is a Philox expansion, and with a dozen of them mixup alone
# took 7 s to compile on CPU.
_GAMMA_TRIES = 8  # parallel Marsaglia-Tsang candidates; even, for Box-Muller pairs
_GAMMA_ROWS = 2 * _GAMMA_TRIES + 1  # normals (from pairs), acceptance tests, the boost
_ROWS = {
    "crop": 2,
    "flip": 1,
    "translate": 2,
    "colour": 4,
    "pairing": 2,  # the partner order, and mixup-or-cutmix for the batch
    "mixup": 2 * _GAMMA_ROWS,
    "cutmix": 2 * _GAMMA_ROWS + 2,  # two gammas and the box centre
    "rot90": 1,  # last, so that adding it left the other ops' draws where they were
    "rotate": 1,  # after rot90, for the same reason
}
_OFFSETS = dict(zip(_ROWS, itertools.accumulate(_ROWS.values(), initial=0)))
_TOTAL_ROWS = sum(_ROWS.values())


class _Draws:
    """The batch's uniform [0, 1) noise table; `rows(op)` is that op's [n, batch] block."""

    def __init__(self, seed: tf.Tensor, batch: tf.Tensor):
        self.table = tf.random.stateless_uniform([_TOTAL_ROWS, batch], seed=seed)

    def rows(self, op: str) -> tf.Tensor:
        start = _OFFSETS[op]
        return self.table[start : start + _ROWS[op]]


def _call_seed(state: tf.Tensor) -> tf.Tensor:
    """The int32 seed for this call on this replica from the SeedGenerator state.

    The state is (seed, calls so far). Replica r of R uses (seed, calls * R + r): distinct
    noise per replica, and with one replica exactly the state itself. int32 because XLA's
    stateless kernels want it (as keras.random casts it).
    """
    replicas, replica = 1, 0
    context = tf.distribute.get_replica_context()
    if context is not None:  # None in a cross-replica context: act as replica 0 of 1
        replicas = context.num_replicas_in_sync
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
    state = tf.stack([state[0], state[1] * replicas + replica])
    return tf.cast(tf.math.floormod(state, tf.int32.max - 1), tf.int32)


def _integers(u: tf.Tensor, count: int) -> tf.Tensor:
    """Uniform integers in [0, count) from uniform [0, 1) noise."""
    return tf.minimum(tf.cast(tf.floor(u * count), tf.int32), count - 1)


def _log_gamma(u: tf.Tensor, alpha: float) -> tf.Tensor:
    """log of Gamma(alpha, 1) samples from a [2 * tries + 1, n] block of uniform noise.

    XLA has no kernel for TF's gamma sampler (so neither keras.random.beta nor gamma
    compile). Marsaglia and Tsang (2000) for alpha + 1, boosted down to alpha by U**(1/alpha),
    in log space so small alphas do not underflow. The rejection loop runs as `tries`
    candidates in parallel, keeping the first accepted. Each is accepted with probability
    about 0.95 or more for any alpha, so the fallback (v = 1) has odds near 0.05**8 = 4e-11.
    """
    tries = (u.shape[0] - 1) // 2
    d = alpha + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    # Box-Muller: two normals from each pair of uniforms; 1 - u is in (0, 1], safe for log.
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[: tries // 2]))
    angle = (2.0 * math.pi) * u[tries // 2 : tries]
    normal = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)  # [tries, n]
    v = (1.0 + c * normal) ** 3
    safe_v = tf.maximum(v, 1e-30)
    log_accept = tf.math.log(1.0 - u[tries : 2 * tries])
    accepted = tf.logical_and(v > 0, log_accept < 0.5 * normal**2 + d - d * safe_v + d * tf.math.log(safe_v))
    first = tf.one_hot(tf.argmax(tf.cast(accepted, tf.int32), axis=0), tries, axis=0)
    log_v = tf.where(tf.reduce_any(accepted, axis=0), tf.reduce_sum(first * tf.math.log(safe_v), axis=0), 0.0)
    boost = tf.math.log(1.0 - u[2 * tries]) / alpha
    return math.log(d) + log_v + boost


def _beta(u: tf.Tensor, alpha: float) -> tf.Tensor:
    """Beta(alpha, alpha) samples from a [2 * _GAMMA_ROWS, n] block of uniform noise.

    G1 / (G1 + G2) for independent Gamma(alpha) G1, G2, computed as a sigmoid of the log
    difference so that it stays finite when both are tiny.
    """
    return tf.sigmoid(_log_gamma(u[:_GAMMA_ROWS], alpha) - _log_gamma(u[_GAMMA_ROWS:], alpha))


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
    """Reflects indices in [-(size - 1), 2 * (size - 1)] into range, as tf.pad(mode="REFLECT")."""
    return (size - 1) - tf.abs((size - 1) - tf.abs(index))


def _shifts(u: tf.Tensor, pad: int) -> tf.Tensor:
    """Per-example integer shifts in [-pad, pad] from [batch] uniform noise."""
    return _integers(u, 2 * pad + 1) - pad


def _partner(u: tf.Tensor) -> tf.Tensor:
    """A random partner for each example from [batch] uniform noise; never itself if batch > 1.

    The batch is put in a random cyclic order and each example mixes with the next one in it,
    so unlike a plain random permutation no example is paired with itself. (argsort because
    XLA has no kernel for StatelessShuffle.)
    """
    order = tf.argsort(u)
    position = tf.argsort(order)  # inverse permutation: where each example sits in `order`
    return tf.gather(tf.roll(order, shift=-1, axis=0), position)


class Augmenter(keras.layers.Layer):
    """Applies the chosen ops, in OPS order, to a float32 0..255 batch and its one-hot labels.

    A Layer so that its SeedGenerator state is tracked and saved with the model's weights. It
    always augments: the train step calls it, evaluation and serving never do.

    Args:
      ops: names from OPS (any order; applied in OPS order). Empty: the layer is an identity.
      seed: the run's --seed.
      mixup_alpha: mixup's lambda ~ Beta(alpha, alpha), per example.
      cutmix_alpha: cutmix's kept-area fraction ~ Beta(alpha, alpha), per example.
      crop_padding: crop reflect-pads by this fraction of the size on each side, then takes a
        random HxW window per example.
      translate_fraction: translate shifts each example by up to this fraction of the size in
        each direction, filling with zeros.
      rotate_degrees: rotate turns each example by up to this many degrees either way.
    """

    def __init__(
        self,
        ops,
        seed: int,
        *,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        crop_padding: float = 0.125,
        translate_fraction: float = 0.1,
        rotate_degrees: float = ROTATE_DEGREES,
        **kwargs,
    ):
        # float32 whatever the global mixed-precision policy: pixel arithmetic in 0..255 and the
        # label weights want the precision; the model casts to its compute dtype itself.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.ops = _canonical(tuple(ops))
        if mixup_alpha <= 0 or cutmix_alpha <= 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be > 0, got {mixup_alpha} and {cutmix_alpha}")
        if not 0 <= crop_padding < 1:
            raise ValueError(f"crop_padding must be in [0, 1), got {crop_padding}")
        if not 0 <= translate_fraction < 1:
            raise ValueError(f"translate_fraction must be in [0, 1), got {translate_fraction}")
        if not 0 <= rotate_degrees <= 180:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
        self.seed = int(seed)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.crop_padding = float(crop_padding)
        self.translate_fraction = float(translate_fraction)
        self.rotate_degrees = float(rotate_degrees)
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="augment_seed")
        # No shape-dependent state; building by tracing call() would only waste a trace.
        self.built = True

    def call(self, images, labels):
        """Augments one batch (on one replica).

        Args:
          images: float32 [B, H, W, 3] RGB in 0..255, H and W static.
          labels: float32 [B, C] one-hot (or already soft) labels.

        Returns:
          (images, labels) of the same shapes and dtypes; images still in 0..255 and label
          rows still summing to 1.
        """
        if not self.ops:
            return images, labels
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            raise ValueError(f"Augmenter needs static image height and width, got shape {images.shape}")
        draws = _Draws(_call_seed(self.seed_generator.next()), tf.shape(images)[0])
        ops = set(self.ops)

        # Each op's ops sit under a name scope of the op's name, so a compiled step's HLO
        # metadata shows which augmentations it holds (tools/bench.py --gpu checks them all).
        if "rotate" in ops:
            with tf.name_scope("rotate"):
                images = _rotate(images, draws.rows("rotate")[0], self.rotate_degrees)
        if ops & {"crop", "flip", "rot90", "translate"}:
            images = self._geometry(images, draws, ops)
        if "colour" in ops:
            with tf.name_scope("colour"):
                images = _colour(images, draws.rows("colour"))
        if "mixup" in ops or "cutmix" in ops:
            u = draws.rows("pairing")
            partner = _partner(u[0])
            if "mixup" in ops and "cutmix" in ops:
                # One or the other per batch, as timm's Mixup(switch_prob) does, never both.
                images, labels = tf.cond(
                    u[1, 0] < CUTMIX_PROBABILITY,
                    lambda: self._cutmix(images, labels, partner, draws.rows("cutmix")),
                    lambda: self._mixup(images, labels, partner, draws.rows("mixup")),
                )
            elif "mixup" in ops:
                images, labels = self._mixup(images, labels, partner, draws.rows("mixup"))
            else:
                images, labels = self._cutmix(images, labels, partner, draws.rows("cutmix"))
        return images, labels

    def _geometry(self, images, draws, ops):
        """After rotate: crop, then flip, then rot90, then translate, as one row gather and one
        column gather (and for rot90 a transpose of the examples that turn a quarter).

        Each op only moves pixels, so together they are a map from output to input positions
        per example, found by walking back from the output through the ops in reverse order.
        One pass over the pixels instead of one per op; on CPU without XLA, flip as reverse
        plus select cost as much as the crop.
        """
        height, width = images.shape[1], images.shape[2]
        batch = tf.shape(images)[0]
        rows = tf.tile(tf.range(height)[None, :], [batch, 1])  # [B, H]: the input row each output row reads
        cols = tf.tile(tf.range(width)[None, :], [batch, 1])  # [B, W]
        inside = None
        if "translate" in ops:
            with tf.name_scope("translate"):
                # Shift by up to translate_fraction of the size, filling with zeros.
                u = draws.rows("translate")
                rows = rows + _shifts(u[0], _pixels(self.translate_fraction, height))[:, None]
                cols = cols + _shifts(u[1], _pixels(self.translate_fraction, width))[:, None]
                row_in = tf.logical_and(rows >= 0, rows < height)
                col_in = tf.logical_and(cols >= 0, cols < width)
                inside = tf.cast(tf.logical_and(row_in[:, :, None], col_in[:, None, :]), images.dtype)[..., None]
                rows, cols = tf.clip_by_value(rows, 0, height - 1), tf.clip_by_value(cols, 0, width - 1)
        quarter_turn = None
        if "rot90" in ops:
            if height != width:
                raise ValueError(f"the rot90 augmentation needs square images, got {height}x{width}")
            with tf.name_scope("rot90"):
                # k quarter turns counterclockwise, k uniform in 0..3: k=1 is the transpose of
                # the image with its columns reversed, k=2 rows and columns reversed, k=3 the
                # transpose with its rows reversed. The reversals join the index map; the
                # transpose is taken after the gathers, so after translate rather than before
                # it, which on a square image draws the same shifts.
                turns = tf.cast(tf.floor(draws.rows("rot90")[0] * 4.0), tf.int32)
                quarter_turn = tf.equal(turns % 2, 1)
                rows = tf.where((turns >= 2)[:, None], height - 1 - rows, rows)
                reverse_cols = tf.logical_or(tf.equal(turns, 1), tf.equal(turns, 2))
                cols = tf.where(reverse_cols[:, None], width - 1 - cols, cols)
        if "flip" in ops:
            with tf.name_scope("flip"):
                flip = draws.rows("flip")[0] < 0.5
                cols = tf.where(flip[:, None], width - 1 - cols, cols)
        if "crop" in ops:
            with tf.name_scope("crop"):
                # Reflect-pad by crop_padding of the size, then a random window: a random shift
                # that reflects at the edges. Reflection cannot reach past the far edge.
                u = draws.rows("crop")
                rows = _reflect(
                    rows + _shifts(u[0], min(_pixels(self.crop_padding, height), height - 1))[:, None], height
                )
                cols = _reflect(cols + _shifts(u[1], min(_pixels(self.crop_padding, width), width - 1))[:, None], width)
        if ops & {"crop", "rot90", "translate"}:
            images = tf.gather(images, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
        if inside is not None:
            images = images * inside
        if quarter_turn is not None:
            with tf.name_scope("rot90"):
                images = tf.where(quarter_turn[:, None, None, None], tf.transpose(images, [0, 2, 1, 3]), images)
        return images

    def _mixup(self, images, labels, partner, u):
        with tf.name_scope("mixup"):
            lam = _beta(u, self.mixup_alpha)
            images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * tf.gather(images, partner)
            labels = lam[:, None] * labels + (1 - lam[:, None]) * tf.gather(labels, partner)
            # A convex combination can round a hair past 255.
            return tf.clip_by_value(images, 0.0, 255.0), labels

    def _cutmix(self, images, labels, partner, u):
        with tf.name_scope("cutmix"):
            height, width = images.shape[1], images.shape[2]
            keep = _beta(u[: 2 * _GAMMA_ROWS], self.cutmix_alpha)
            # A box of side ratio sqrt(1 - keep) around a uniform centre, clipped to the image
            # (Yun et al. 2019); the label weight is the area actually pasted, after clipping.
            ratio = tf.sqrt(1.0 - keep)
            cy, cx = u[2 * _GAMMA_ROWS] * height, u[2 * _GAMMA_ROWS + 1] * width
            half_h, half_w = 0.5 * ratio * height, 0.5 * ratio * width
            y0 = tf.clip_by_value(tf.round(cy - half_h), 0.0, float(height))
            y1 = tf.clip_by_value(tf.round(cy + half_h), 0.0, float(height))
            x0 = tf.clip_by_value(tf.round(cx - half_w), 0.0, float(width))
            x1 = tf.clip_by_value(tf.round(cx + half_w), 0.0, float(width))
            # The box as a mask from iota comparisons: XLA-friendly, no dynamic slicing.
            iy = tf.range(height, dtype=tf.float32)[None, :]
            ix = tf.range(width, dtype=tf.float32)[None, :]
            in_rows = tf.logical_and(iy >= y0[:, None], iy < y1[:, None])  # [B, H]
            in_cols = tf.logical_and(ix >= x0[:, None], ix < x1[:, None])  # [B, W]
            box = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])  # [B, H, W]
            images = tf.where(box[..., None], tf.gather(images, partner), images)
            pasted = tf.reduce_mean(tf.cast(box, tf.float32), axis=[1, 2])
            labels = (1 - pasted[:, None]) * labels + pasted[:, None] * tf.gather(labels, partner)
            return images, labels

    # Keras's save_weights skips SeedGenerator state (it is in `variables`, not `weights`).
    # Saving it here makes a resumed run continue the augmentation sequence instead of
    # replaying it from the start.
    def save_own_variables(self, store):
        store["0"] = self.seed_generator.state

    def load_own_variables(self, store):
        if "0" in store:  # absent in weights saved before the augmenter was added
            self.seed_generator.state.assign(store["0"])

    def get_config(self):
        config = super().get_config()
        config.update(
            ops=list(self.ops),
            seed=self.seed,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            crop_padding=self.crop_padding,
            translate_fraction=self.translate_fraction,
            rotate_degrees=self.rotate_degrees,
        )
        return config


def _rotate(images: tf.Tensor, u: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """Turns each image about its centre by an angle uniform in [-max, max] degrees, bilinear,
    reflecting at the edges (so no empty corners). Four batched gathers on the flattened
    pixels: XLA has no ImageProjectiveTransform kernel."""
    height, width = images.shape[1], images.shape[2]
    angle = (2.0 * u - 1.0) * (max_degrees * math.pi / 180.0)  # [B]
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    y = tf.range(height, dtype=tf.float32)[None, :, None] - cy  # [1, H, 1]
    x = tf.range(width, dtype=tf.float32)[None, None, :] - cx  # [1, 1, W]
    # Each output pixel reads the input at its position turned back by the angle.
    src_y = cos * y - sin * x + cy  # [B, H, W]
    src_x = sin * y + cos * x + cx
    y0, x0 = tf.floor(src_y), tf.floor(src_x)
    wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    flat = tf.reshape(images, [tf.shape(images)[0], height * width, images.shape[3]])

    def read(rows, cols):
        rows = _reflect(tf.clip_by_value(rows, -(height - 1), 2 * (height - 1)), height)
        cols = _reflect(tf.clip_by_value(cols, -(width - 1), 2 * (width - 1)), width)
        index = tf.reshape(rows * width + cols, [tf.shape(images)[0], height * width])
        return tf.reshape(tf.gather(flat, index, axis=1, batch_dims=1), tf.shape(images))

    top = (1 - wx) * read(y0, x0) + wx * read(y0, x0 + 1)
    bottom = (1 - wx) * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
    return (1 - wy) * top + wy * bottom


def _pixels(fraction: float, size: int) -> int:
    return int(math.floor(fraction * size + 0.5))


def _colour(images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Per-example brightness, contrast, saturation and hue jitter, in one pass over the pixels.

    Saturation and hue scale and rotate the chroma plane of YIQ, a 3x3 matrix on RGB that keeps
    grey pixels grey (cheaper than rgb<->hsv). Brightness scales and contrast blends with the
    image's mean luma, so with no clipping in between all four are one affine map per example,
    clipped to 0..255 once. (torchvision clips after each and shuffles their order.)
    """
    brightness = 1 + BRIGHTNESS * (2 * u[0] - 1)
    contrast = 1 + CONTRAST * (2 * u[1] - 1)
    saturation = 1 + SATURATION * (2 * u[2] - 1)
    angle = HUE * (2 * u[3] - 1) * (2 * math.pi)

    cos, sin = saturation * tf.cos(angle), saturation * tf.sin(angle)
    one, zero = tf.ones_like(cos), tf.zeros_like(cos)
    chroma = tf.stack(
        [tf.stack([one, zero, zero], -1), tf.stack([zero, cos, -sin], -1), tf.stack([zero, sin, cos], -1)], -2
    )  # [B, 3, 3] acting on (Y, I, Q)
    to_yiq = tf.constant(_RGB_TO_YIQ, tf.float32)
    to_rgb = tf.constant(_YIQ_TO_RGB, tf.float32)
    matrix = tf.einsum("ij,bjk,kl->bil", to_rgb, chroma, to_yiq)  # [B, 3, 3] on RGB

    # contrast(brightness(x)) = c * b * x + (1 - c) * b * mean_luma(x); the matrix maps the
    # grey offset to itself.
    mean_luma = tf.linalg.matvec(tf.reduce_mean(images, axis=[1, 2]), tf.constant(_LUMA, tf.float32))  # [B]
    scale = (contrast * brightness)[:, None, None]
    offset = ((1 - contrast) * brightness * mean_luma)[:, None, None, None]
    images = tf.einsum("bhwc,bdc->bhwd", images, scale * matrix) + offset
    return tf.clip_by_value(images, 0.0, 255.0)
