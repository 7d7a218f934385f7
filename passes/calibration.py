"""Calibration ranges for every method from one streamed collection.

ONNX Runtime's calibrators (``onnxruntime.quantization.calibrate``) each run the model over
the whole calibration set, and the histogram ones (entropy, percentile) keep every
intermediate tensor of every batch in memory until the end (about 5 GB for
EfficientNet-Lite0 on 64 crops at 224x224), so trying three methods costs three collections
and that peak. :func:`collect_tables` runs ORT's augmented model (every tensor to calibrate
exposed as an output, built by ORT's own ``create_calibrator``) twice over the set, one batch at a
time, keeping only running statistics:

1. per tensor: min and max (per batch, for ``moving_average``), and the minimum of ``|x|`` for
   symmetric percentile;
2. per tensor and histogram method: a histogram with fixed edges over ``[-t, t]``,
   ``t = max(|min|, |max|)`` (over ``[min |x|, max |x|]`` for symmetric percentile), summed over
   batches.

Those are exactly the histograms ORT builds when it collects all batches at once (same range,
same bin count), so ORT's own threshold searches (``HistogramCollector.compute_entropy``,
``compute_percentile``) run on them unchanged, and min-max is the running min and max (ORT's
``MinMaxCalibrater`` semantics, symmetric and moving-average included). Peak memory is one
batch of intermediate tensors; time is two model runs plus the histogram updates, for all
methods together.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import PassError

from .loading import iter_batches
from .quantizer import ENTROPY_DEFAULT_BINS, METHODS, quiet_logger

#: Most samples per streamed run: one run's intermediate tensors are the collection's peak memory
#: (about 0.6 GiB for EfficientNet-Lite0 at 224x224 with 4). ``moving_average`` keeps the recipe's
#: batch size, since its result is a mean over batches.
STREAM_BATCH = 4
#: ORT's PercentileCalibrater default histogram size.
PERCENTILE_DEFAULT_BINS = 2048
#: ORT's EntropyCalibrater default quantized-bin count.
ENTROPY_QUANTIZED_BINS = 128


def _minmax(a: np.ndarray) -> tuple[float, float]:
    mn, mx = float(a.min()), float(a.max())
    if np.isnan(mn) or np.isnan(mx):  # NaN propagates through min/max; ORT's calibrators ignore it
        mn, mx = float(np.nanmin(a)), float(np.nanmax(a))
    return mn, mx


def uniform_histogram(a: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """``np.histogram(a, bins, range=(lo, hi))[0]`` for ``a`` inside ``[lo, hi]`` (int64 ``(bins,)``), by
    index arithmetic and ``np.bincount`` (about 3x faster than ``np.histogram`` on large float32
    tensors). A value within float32 rounding of a bin edge may land in the neighbouring bin;
    NaNs are dropped, as ``np.histogram`` drops out-of-range values."""
    if not hi > lo:
        return np.histogram(a, bins, range=(lo, hi))[0]
    idx = (a - np.float32(lo)) * np.float32(bins / (hi - lo))
    idx = idx[~np.isnan(idx)] if np.isnan(idx).any() else idx
    idx = np.clip(idx, 0, bins - 1, out=idx).astype(np.intp)
    return np.bincount(idx.ravel(), minlength=bins)[:bins]


def entropy_threshold(histogram: tuple[Any, ...], num_quantized_bins: int) -> tuple[Any, Any]:
    """ONNX Runtime's KL-divergence threshold search (``HistogramCollector.get_entropy_threshold``,
    after TensorRT's "8-bit Inference with TensorRT", GTC 2017), with its per-bin Python loops
    replaced by array operations: the same candidates, the same integer truncation of the expanded
    distribution ``q``, ORT's own ``smooth_distribution`` and ``entropy``, the same clamping to the
    observed min/max. ``histogram``: ``(hist, edges, min, max, threshold)`` as ORT stores it.
    Returns ``(low, high)`` as 0-d arrays of the edges' dtype. ORT's loop costs about 0.1 s per
    tensor at 512 bins (12 s for EfficientNet-Lite0's 95 tensors); this one a few ms."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist = np.asarray(histogram[0]).astype(np.int64)
    edges = histogram[1]
    nb = hist.size
    zero = nb // 2
    half = num_quantized_bins // 2
    dtype = edges.dtype
    csum = np.concatenate([[0], np.cumsum(hist)])
    total = csum[-1]
    kl = np.zeros(zero - half + 1)
    thresholds = []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, nb)
        thresholds.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += total - csum[end]
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        qb = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        qb[-1] += sliced[body:].sum()
        norm = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            expanded = np.where(norm != 0, qb / np.where(norm == 0, 1, norm), 0.0)
        q[:body] = np.repeat(expanded, merged).astype(np.int64)  # ORT assigns floats into an int64 array
        ps, qs = smooth_distribution(p), smooth_distribution(q)
        kl[i - half] = np.inf if ps is None or qs is None else float(np.array(entropy(ps, qs), dtype=dtype))
    lo, hi = thresholds[int(np.argmin(kl))]
    lo, hi = np.array(lo, dtype=dtype), np.array(hi, dtype=dtype)
    if lo < histogram[2]:
        lo = histogram[2]
    if hi > histogram[3]:
        hi = histogram[3]
    return lo, hi


#: Candidate ends per side tried by :func:`mse_range` (fractions of the observed min and max).
MSE_CANDIDATES = 128


def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, levels: int = 256) -> tuple[float, float]:
    """The ``[low, high]`` range (containing 0, within the observed ``[lo, hi]``) whose uniform
    ``levels``-step quantization minimizes the histogram's mean squared error, rounding and
    clipping together (the "mse" range estimator of NVIDIA's pytorch-quantization
    ``HistogramCalibrator`` and of TensorRT's legacy calibrators, here for asymmetric ranges).

    ``hist`` ``(B,)`` counts over ``edges`` ``(B + 1,)``; each bin's count sits at its centre, which
    is quantized-dequantized exactly as ``QuantizeLinear``/``DequantizeLinear`` would. Each end is
    searched over :data:`MSE_CANDIDATES` fractions of ``lo`` and ``hi`` in ``(0, 1]``, the high end
    first with the low end at ``lo``, then the low end, twice (coordinate descent).
    Returns ``(low, high)`` as floats.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not hi > lo:
        return lo, hi
    c = ((edges[:-1] + edges[1:]) / 2).astype(np.float64)
    h = np.asarray(hist, np.float64)
    keep = h > 0
    c, h = c[keep], h[keep]
    frac = np.linspace(1.0 / MSE_CANDIDATES, 1.0, MSE_CANDIDATES)

    def errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        step = ((b - a) / (levels - 1))[:, None]
        q = np.clip(np.round((c[None, :] - a[:, None]) / step), 0, levels - 1) * step + a[:, None]
        return ((c[None, :] - q) ** 2 * h[None, :]).sum(axis=1)

    a, b = lo, hi
    for _ in range(2):
        if hi > 0:
            cand = hi * frac
            b = float(cand[np.argmin(errors(np.full_like(cand, a), cand))])
        if lo < 0:
            cand = lo * frac
            a = float(cand[np.argmin(errors(cand, np.full_like(cand, b)))])
    return a, b


def collect_tables(
    model: str | Path,
    data: dict[str, np.ndarray],
    names: list[str],
    batch: int,
    methods: list[str] | tuple[str, ...],
    options: dict[str, Any],
    scratch: Path | None = None,
    progress: Callable[..., None] = lambda *_a, **_k: None,
) -> dict[str, Any]:
    """Calibration tables (ORT ``TensorsData``) for each of ``methods`` from one streamed collection.

    Args:
        model: float ONNX file.
        data: calibration inputs ``{name: (N, ...)}``; ``names``: the model's input names, in order.
        batch: samples per run (must fit the model's batch dimension).
        methods: among ``minmax``, ``entropy``, ``percentile``.
        options: ``symmetric``, ``moving_average`` (minmax), ``percentile``, ``num_bins``
            (``calibrate``'s options; entropy defaults to :data:`ENTROPY_DEFAULT_BINS` bins,
            percentile to :data:`PERCENTILE_DEFAULT_BINS`).
        progress: ``progress(message, done, total)`` per batch.

    Returns ``{method: TensorsData}``.

    Raises:
        PassError: ORT cannot build the augmented model or run it, or the set is empty.
    """
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCollector,
        TensorsData,
        create_calibrator,
    )

    symmetric = bool(options.get("symmetric", False))
    bins = {
        "entropy": options.get("num_bins") or ENTROPY_DEFAULT_BINS,
        "percentile": options.get("num_bins") or PERCENTILE_DEFAULT_BINS,
        "mse": options.get("num_bins") or PERCENTILE_DEFAULT_BINS,
    }
    hist_methods = [m for m in methods if m in bins]
    if not options.get("moving_average"):
        batch = min(batch, STREAM_BATCH)  # the statistics do not depend on it; peak memory does
    total = len(data[names[0]])
    if total == 0:
        raise PassError("calibrate: the calibration set is empty")
    n_batches = -(-total // batch)

    def batches(sess: Any, what: str) -> Any:
        for k, (_, feeds) in enumerate(iter_batches(data, names, batch)):
            progress(f"calibrating ({what})", k, n_batches)
            yield sess.run(None, feeds)
        progress(f"calibrating ({what})", n_batches, n_batches)

    with tempfile.TemporaryDirectory(prefix="accelc-calib-", dir=scratch) as tmp, quiet_logger("onnxruntime"):
        try:
            # ORT's histogram augmented model (every tensor to calibrate an output), one batch at a time:
            # pass 1 the ranges, pass 2 the histograms over them. (ORT's own ReduceMin/ReduceMax
            # augmented model measured slower here than reducing the outputs in numpy.)
            cal = create_calibrator(
                Path(model), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Percentile, extra_options={"symmetric": symmetric},
            )
            sess = cal.infer_session
            out_names = [o.name for o in sess.get_outputs()]
            wanted = [(i, n) for i, n in enumerate(out_names) if n in cal.tensors_to_calibrate]
            tensors = [n for _, n in wanted]
            batch_lo: dict[str, list[float]] = {n: [] for n in tensors}
            batch_hi: dict[str, list[float]] = {n: [] for n in tensors}
            alo: dict[str, float] = {}  # min |x|: symmetric percentile's histogram starts there
            need_abs = symmetric and "percentile" in hist_methods
            for outs in batches(sess, "ranges"):
                for i, n in wanted:
                    a = np.asarray(outs[i])
                    mn, mx = _minmax(a) if a.size else (0.0, 0.0)
                    batch_lo[n].append(mn)
                    batch_hi[n].append(mx)
                    if need_abs:
                        amin = _minmax(np.abs(a))[0] if a.size else 0.0
                        alo[n] = min(alo.get(n, amin), amin)
            lo = {n: min(v) for n, v in batch_lo.items()}
            hi = {n: max(v) for n, v in batch_hi.items()}
            ahi = {n: max(abs(lo[n]), abs(hi[n])) for n in tensors}
            hists: dict[str, dict[str, np.ndarray]] = {m: {} for m in hist_methods}
            # signed histograms over [-t, t]: the finest one, and coarser ones summed from it
            signed = [m for m in hist_methods if not (m == "percentile" and symmetric)]
            finest = max((bins[m] for m in signed), default=0)
            for outs in batches(sess, "histograms") if hist_methods else ():
                for i, n in wanted:
                    a = np.asarray(outs[i]).ravel()
                    t = ahi[n]
                    fine = uniform_histogram(a, finest, -t, t) if signed else None
                    for m in hist_methods:
                        if m not in signed:
                            h = uniform_histogram(np.abs(a), bins[m], alo[n], ahi[n])
                        elif finest % bins[m] == 0:
                            h = fine.reshape(bins[m], -1).sum(axis=1)
                        else:
                            h = uniform_histogram(a, bins[m], -t, t)
                        hists[m][n] = hists[m].get(n, 0) + h
            del cal, sess
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"calibrate: {type(e).__name__}: {e}") from e

    tables: dict[str, Any] = {}
    f32 = np.float32
    for m in methods:
        if m == "minmax":
            pairs = {}
            for n in tensors:
                mn, mx = (
                    (float(np.mean(batch_lo[n])), float(np.mean(batch_hi[n])))
                    if options.get("moving_average")
                    else (lo[n], hi[n])
                )
                if symmetric:
                    t = max(abs(mn), abs(mx))
                    mn, mx = -t, t
                pairs[n] = (np.array([mn], f32), np.array([mx], f32))
            tables[m] = TensorsData(CalibrationMethod.MinMax, pairs)
            continue
        if m == "mse":
            pairs = {}
            for n in tensors:
                t = max(abs(lo[n]), abs(hi[n]))
                edges = np.linspace(-t, t, bins[m] + 1)
                mn, mx = mse_range(hists[m][n], edges, lo[n], hi[n])
                if symmetric:
                    mn, mx = -max(abs(mn), mx), max(abs(mn), mx)
                pairs[n] = (np.array([mn], f32), np.array([mx], f32))
            # ORT has no MSE calibrator; the table is a plain range table, as min-max's is
            tables[m] = TensorsData(CalibrationMethod.MinMax, pairs)
            continue
        collector = HistogramCollector(
            method=m, symmetric=symmetric, num_bins=bins[m], num_quantized_bins=ENTROPY_QUANTIZED_BINS,
            percentile=options.get("percentile", 99.999), scenario="same",
        )
        for n in tensors:
            h = hists[m][n]
            if m == "percentile" and symmetric:
                edges = np.linspace(alo[n], ahi[n], bins[m] + 1).astype(f32)
                collector.histogram_dict[n] = (h, edges, np.array(lo[n], f32), np.array(hi[n], f32))
            else:
                t = max(abs(lo[n]), abs(hi[n]))
                edges = np.linspace(-t, t, bins[m] + 1).astype(f32)
                collector.histogram_dict[n] = (
                    h, edges, np.array(lo[n], f32), np.array(hi[n], f32), np.array(t, f32)
                )
        if m == "entropy":
            result = {
                n: (*entropy_threshold(h, ENTROPY_QUANTIZED_BINS), *h[:2]) for n, h in collector.histogram_dict.items()
            }
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress, which tears the display
                result = collector.compute_collection_result()
        tables[m] = TensorsData(CalibrationMethod[METHODS[m]], result)
    return tables
