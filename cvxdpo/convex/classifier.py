"""ConvexReLUClassifier: the convex two-layer ReLU network as a small estimator (fit / predict / certify).

    clf = ConvexReLUClassifier(num_gates=64, beta=1e-2, loss="logistic").fit(X, y)
    clf.predict(X_new); clf.objective(); clf.duality_gap(); W1, w2 = clf.to_relu_network()

With a mesh, gate columns are split over `gate_axis` (and rows over
`row_axis` when given) and the ADMM runs under `jax.shard_map`.

Bad arguments (an empty or non-numeric X, num_gates < 1, features that differ
from fit's, predict before fit) raise a ConfigError or DataError (both
ValueErrors) that says what is wrong, before any JAX work.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cvxdpo.convex import admm
from cvxdpo.convex import gated_relu as gr
from cvxdpo.errors import ConfigError, DataError


@dataclasses.dataclass
class ConvexReLUClassifier:
    num_gates: int = 64
    beta: float = 1e-3
    loss: str = "squared"
    variant: str = "gated"
    seed: int = 0
    max_iter: int = 20_000
    preconditioner: str = "shared"
    pass_dtype: str | None = "float32"  # CG passes over X in float32 on float64 data (None: exact)
    adaptive_rho: bool | None = None  # None: the solver's default for the variant
    gap_tol: float = 1e-7
    mesh: jax.sharding.Mesh | None = None
    gate_axis: str | None = "tensor"
    row_axis: str | None = None

    def _config(self) -> admm.ADMMConfig:
        return admm.ADMMConfig(loss=self.loss, variant=self.variant, beta=self.beta, max_iter=self.max_iter,
                               preconditioner=self.preconditioner, adaptive_rho=self.adaptive_rho,
                               gap_tol=self.gap_tol, pass_dtype=self.pass_dtype)

    def _axes(self) -> gr.Axes:
        return gr.Axes(self.gate_axis, self.row_axis) if self.mesh is not None else gr.Axes()

    def _check(self, X, y=None):
        """X as a float array (and y), or DataError; at predict time X must have fit's features."""
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":  # bool, int, unsigned, float
            raise DataError(f"X must hold real numbers, got an array of dtype {X.dtype}")
        if X.dtype.kind != "f":
            X = X.astype(np.float64)  # integer or boolean features; jnp.asarray narrows to JAX's float width
        if X.ndim != 2:
            raise DataError(f"X must be a 2-D (samples, features) array, got shape {X.shape}")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise DataError(f"X has shape {X.shape}: it needs at least one sample and one feature")
        if y is None and X.shape[1] != self.gates_.shape[0]:
            raise DataError(f"X has {X.shape[1]} features; the classifier was fitted on {self.gates_.shape[0]}")
        if not np.isfinite(X).all():
            raise DataError(f"X holds {int((~np.isfinite(X)).sum())} NaN or infinite values")
        if y is None:
            return X, None
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise DataError(f"y has shape {y.shape} but X has {X.shape[0]} rows; y must be ({X.shape[0]},)")
        values = set(np.unique(y).tolist())
        if not (values <= {-1, 1} or values <= {0, 1}):
            raise DataError(f"labels must be +-1 or 0/1, got values {sorted(values)[:5]}")
        if len(values) < 2:
            raise DataError(f"all labels are {values.pop()}: a classifier needs both classes")
        return X, y

    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise ConfigError("this ConvexReLUClassifier is not fitted yet: call fit(X, y) first")

    def fit(self, X, y, warm_start: bool = False) -> "ConvexReLUClassifier":
        if isinstance(self.num_gates, bool) or not isinstance(self.num_gates, (int, np.integer)) \
                or self.num_gates < 1:
            raise ConfigError(f"num_gates must be a positive integer, got {self.num_gates!r}")
        cfg = self._config()
        X, y = self._check(X, y)
        self.zero_one_ = set(np.unique(y).tolist()) <= {0, 1}
        n, d = X.shape
        axes = self._axes()
        if self.mesh is not None:
            gates, rows = self.mesh.shape.get(self.gate_axis, 1), self.mesh.shape.get(self.row_axis, 1)
            if self.num_gates % gates:
                raise ConfigError(f"num_gates={self.num_gates} is not divisible by the mesh's {self.gate_axis} axis "
                                  f"of size {gates}")
            if n % rows:
                raise ConfigError(f"{n} rows are not divisible by the mesh's {self.row_axis} axis of size {rows}")
        dtype = jnp.asarray(X).dtype
        self.gates_ = gr.sample_gates(self.seed, d, self.num_gates, dtype)
        Xj, yj = jnp.asarray(X), gr.to_pm1(jnp.asarray(y, dtype))
        M = gr.expand_masks(gr.masks(Xj, self.gates_), self.variant)
        signs = gr.column_signs(self.num_gates, self.variant, dtype)
        if not (warm_start and hasattr(self, "state_") and self.state_.z.shape == (n,)):
            self.state_ = admm.init_state(n, d, self.num_gates, self.variant, cfg.rho, dtype)
        solver = admm.make_solver(cfg, self.mesh, axes)
        self.state_, info = solver(Xj, yj, M, signs, self.state_)
        self.info_ = jax.device_get(info)
        if int(self.info_.status) == admm.DIVERGED:
            raise DataError("ADMM diverged (residuals became NaN or infinite); try a larger beta or rescale X")
        if int(self.info_.status) == admm.MAX_ITER:
            stopped = f"relative duality gap {float(self.info_.gap):.1e} > gap_tol={self.gap_tol:g}" \
                if self.variant == "gated" and self.gap_tol > 0 else "the residuals above their tolerances"
            warnings.warn(f"ConvexReLUClassifier stopped at max_iter={self.max_iter} with {stopped}; raise max_iter "
                          "or beta (beta multiplies the summed loss: it scales with n)", RuntimeWarning, stacklevel=2)
        self._data = (Xj, yj, M, signs)
        return self

    @property
    def weights_(self) -> jax.Array:
        """The solution: v (group-sparse) for the gated model, u (cone-feasible) for the exact ReLU model."""
        self._check_fitted()
        return self.state_.v if self.variant == "gated" else self.state_.u

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X, _ = self._check(X)
        Xj = jnp.asarray(X, self.gates_.dtype)
        M = gr.expand_masks(gr.masks(Xj, self.gates_), self.variant)
        return np.asarray(gr.forward(Xj, M, gr.column_signs(self.num_gates, self.variant, Xj.dtype), self.weights_))

    def predict(self, X) -> np.ndarray:
        positive = self.decision_function(X) > 0
        return np.where(positive, 1, 0 if self.zero_one_ else -1)

    def objective(self) -> float:
        self._check_fitted()
        X, y, M, signs = self._data
        return float(gr.objective(X, y, M, signs, self.weights_, self.beta, self.loss))

    def duality_gap(self) -> float:
        """Relative duality gap of the gated solution: an upper bound on its relative suboptimality."""
        if self.variant != "gated":
            raise ConfigError("the duality-gap certificate is defined for the gated model only")
        self._check_fitted()
        X, y, M, signs = self._data
        primal = gr.objective(X, y, M, signs, self.weights_, self.beta, self.loss)
        # the solver's best certified bound (normalized dual points), or the one z gives if better
        dual = jnp.maximum(self.info_.lower_bound, gr.dual_value(X, y, M, signs, self.state_.z, self.beta, self.loss))
        return float((primal - dual) / jnp.abs(primal))

    def to_relu_network(self) -> tuple[np.ndarray, np.ndarray]:
        """(W1 (d, m), w2 (m,)) of the two-layer network recovered from the nonzero groups:
        first layer u_i / sqrt(||u_i||), second layer +-sqrt(||u_i||). For the exact ReLU model,
        x -> relu(x W1) w2 reproduces the convex model and beta/2 (||W1||^2 + ||w2||^2) its penalty."""
        U = np.asarray(self.weights_)
        norms = np.linalg.norm(U, axis=0)
        keep = norms > 0
        signs = np.asarray(gr.column_signs(self.num_gates, self.variant, U.dtype))
        scale = np.sqrt(norms[keep])
        return U[:, keep] / scale, signs[keep] * scale
