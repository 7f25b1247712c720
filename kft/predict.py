"""`python -m kft.predict --export_dir=D IMAGE_OR_FOLDER...`: top classes of images with an export.

D is a SavedModel written by kft (the export base, whose latest version is used, or one version
directory). Folders are walked recursively for .jpg/.jpeg/.png/.bmp/.gif files (any case; hidden
folders skipped); a file named on the command line is tried whatever its extension. Output, in
command-line order (each folder's files sorted):

    a table (default): one row per class, the top --top_k classes of each image
    --json:            one JSON object per line: {"path": ..., "top_k": [{"class": ..., "probability": ...}, ...]},
                       or {"path": ..., "error": ...} for a file that could not be decoded

A file that cannot be read or decoded is reported (a stderr line naming it) and counted, not
fatal. Exit status: 0 if at least one image was predicted, 1 if none was, 2 for bad arguments
(a path that does not exist, a bad export directory).

Images are decoded as `kft.data` decodes them (TF, or PIL for BMPs and files TF rejects;
grayscale, RGBA and palette images become RGB, the first frame of a GIF is used) and resized
to the size the model was trained at with `kft.data.resize_images`, the resize inside the
model: kft.predict, kft.evaluate and a server fed the whole image report the same probabilities.
"""

import concurrent.futures
import json
import os
import sys

from absl import flags

from kft import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines kft.predict's flags; only `python -m kft.predict` calls it, so the library below
    can be imported beside kft.train's flags (--image_size, --batch_size are theirs too)."""
    flags.DEFINE_string(
        "export_dir",
        None,
        "A SavedModel written by kft: the export base directory (its latest integer version is used) or one version directory.",
    )
    flags.DEFINE_integer(
        "top_k",
        5,
        "How many classes to show per image, most probable first (at most the number of classes).",
        lower_bound=1,
    )
    flags.DEFINE_bool("json", False, "Print one JSON object per image and line instead of a table.")
    cli.define_export_image_size()
    flags.DEFINE_integer("batch_size", 32, "Images per model call.", lower_bound=1)
    flags.mark_flag_as_required("export_dir")


def _image_files(paths: list[str]) -> list[str]:
    """Files named directly, plus image files under named folders, in order (folders sorted)."""
    from kft import data_folder

    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        files.extend(data_folder.image_files(path)[0])  # As kft.data lists a folder.
    return files


def _decode(path: str, image_size: int):
    """uint8 [S, S, 3] of one file, or the reason it cannot be decoded (a one-line string)."""
    import numpy as np
    import tensorflow as tf

    from kft import data, data_folder

    problem = data_folder.file_problem(path)
    if problem:
        return problem
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror}"
    image = None
    # TF decodes in C++ without the GIL; BMPs go to PIL as in kft.data (TF mishandles 1-bit
    # and palette BMPs), and so does anything TF rejects.
    if not contents.startswith(b"BM"):
        try:
            image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        except tf.errors.OpError:
            image = None
    if image is None:
        try:
            image = data_folder.decode_with_pil(path)
        except Exception as e:  # Truncated, not an image, decompression bomb, ...
            return " ".join(f"cannot decode: {e}".split()) or "cannot decode"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "cannot decode: empty image"
    return np.asarray(data.resize_uint8(tf.convert_to_tensor(image), image_size))


def _batches(files: list[str], image_size: int, batch_size: int):
    """Yields (paths, decoded images or error strings) per batch; decodes the next batch meanwhile."""
    workers = min(8, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(start):
            chunk = files[start : start + batch_size]
            return chunk, [pool.submit(_decode, path, image_size) for path in chunk]

        pending = submit(0) if files else None
        for start in range(batch_size, len(files) + batch_size, batch_size):
            chunk, futures = pending
            pending = submit(start) if start < len(files) else None
            yield chunk, [future.result() for future in futures]


class _Printer:
    """Writes results as an aligned table or as JSON lines; errors always go to stderr too."""

    def __init__(self, as_json: bool, files: list[str], class_names: list[str], top_k: int):
        self.as_json = as_json
        self.top_k = top_k
        self.path_width = max(len("image"), *(len(p) for p in files))
        self.class_width = max(len("class"), *(len(n) for n in class_names))
        self.header_done = False

    def prediction(self, path: str, top: list[tuple[str, float]]) -> None:
        if self.as_json:
            entries = [{"class": name, "probability": probability} for name, probability in top]
            print(json.dumps({"path": path, "top_k": entries}))
            return
        if not self.header_done:
            print(f"{'image':<{self.path_width}}  rank  {'class':<{self.class_width}}  probability")
            self.header_done = True
        for rank, (name, probability) in enumerate(top, start=1):
            shown = path if rank == 1 else ""
            print(f"{shown:<{self.path_width}}  {rank:>4}  {name:<{self.class_width}}  {probability:>11.4f}")

    def error(self, path: str, reason: str) -> None:
        print(cli.error_line(f"{path}: {reason}"), file=sys.stderr)  # One bounded line.
        if self.as_json:
            print(json.dumps({"path": path, "error": reason}))


def predict(
    paths: list[str],
    *,
    export_dir: str,
    top_k: int = 5,
    as_json: bool = False,
    image_size: int | None = None,
    batch_size: int = 32,
) -> int:
    """Prints the `top_k` classes of every image file in `paths` (files, or folders searched for
    image files) with the export in `export_dir`; arguments are the flags of the same names.

    Returns:
      The exit status: 0 if any image was predicted, else 1.

    Raises:
      cli.UsageError: bad input (one line).
    """
    if not paths:
        raise cli.UsageError("no images given: python -m kft.predict --export_dir=D IMAGE_OR_FOLDER...")
    # Cheap checks before the model is loaded.
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise cli.UsageError(
            f"{missing[0]} does not exist" + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    if not os.path.isdir(export_dir):
        raise cli.UsageError(f"--export_dir={export_dir} does not exist or is not a directory")

    import numpy as np

    from kft import export  # Heavy imports after the arguments are known to be good.

    try:
        served = export.load_serving(export_dir)
    except ValueError as e:
        raise cli.UsageError(f"--export_dir={export_dir}: {e}") from None
    class_names = list(served.class_names)
    try:
        image_size = export.choose_image_size(image_size, served.image_size, served.path)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    top_k = min(top_k, len(class_names))

    files = _image_files(paths)
    if not files:
        from kft import data_folder

        extensions = ", ".join(data_folder.IMAGE_EXTENSIONS)
        message = f"no image files ({extensions}, any case) under {' '.join(paths)}"
        print(cli.error_line(message, "kft.predict"), file=sys.stderr, flush=True)
        return 1
    printer = _Printer(as_json, files, class_names, top_k)
    predicted = failed = 0
    for chunk, decoded in _batches(files, image_size, batch_size):
        good = [i for i, image in enumerate(decoded) if not isinstance(image, str)]
        probabilities = served(np.stack([decoded[i] for i in good])) if good else np.zeros((0, len(class_names)))
        rows = dict(zip(good, probabilities))
        for i, path in enumerate(chunk):
            if i not in rows:
                printer.error(path, decoded[i])
                failed += 1
                continue
            # Stable sort on -p: ties keep class-index order.
            order = np.argsort(-rows[i], kind="stable")[:top_k]
            printer.prediction(path, [(class_names[c], float(rows[i][c])) for c in order])
            predicted += 1
        sys.stdout.flush()

    summary = f"predicted {predicted} images with {served.path} at {image_size} px"
    if failed:
        summary += f"; {failed} file{'s' if failed > 1 else ''} could not be decoded"
    # JSON mode keeps stdout to JSON lines only.
    print(summary, file=sys.stderr if as_json else sys.stdout)
    return 0 if predicted else 1


def main(argv):
    sys.exit(
        predict(
            argv[1:],
            export_dir=FLAGS.export_dir,
            top_k=FLAGS.top_k,
            as_json=FLAGS.json,
            image_size=FLAGS.image_size,
            batch_size=FLAGS.batch_size,
        )
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
