"""The candidate forms of the joint law L(N, M, D): Chinchilla's law with a memory of M parameters.

Every form is E + A/N^α + B/D^β at M = 0 (the memory-free limit), with the same five dense
parameters, plus two memory parameters. Memory sizes enter relative to `m_ref` (the geometric
mean of the fitted rows' positive M), N in the interaction relative to `n_ref` (that of N):
- additive:  E·(1 − φ) + E·φ·(1 + M/m_ref)^(−γ) + A/N^α + B/D^β, G = φ·E the part of the
  dense floor a large memory removes (a separate capacity term, C/(M + M_0)^γ rewritten so its
  value at M = 0 is inside E);
- effective_params:  N_eff = N·(1 + κ·(M/m_ref)^γ) in place of N;
- interaction:  A/N^α · (1 + M/m_ref)^(−(δ + ι·log(N/n_ref))) — the memory's effect on the
  model-size term changes with N (the exponent interaction of Ludziejewski et al. 2025).
Fits are in log space on θ = [a, b, e, α, β, memory parameters] with a = log A, b = log B,
e = log E; `terms` returns each form's log terms z_k and their nonzero ∂z_k/∂θ_q, so
log L̂ = logsumexp_k z_k and its gradient is Σ_k softmax_k·∂z_k/∂θ (see `joint.JointProblem`).

Legend: S parameter vectors, P points, Q parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE = ("A", "B", "E", "alpha", "beta")
DENSE_BOUNDS = [(None, None)] * 3 + [(0.0, 5.0)] * 2


@dataclass(frozen=True)
class Inputs:
    """Log inputs of the points: u_n = log N, u_d = log D, and the memory's two transforms."""

    u_n: np.ndarray
    u_d: np.ndarray
    ell: np.ndarray       # log(1 + M / m_ref), 0 at M = 0
    log_m: np.ndarray     # log(M / m_ref) where M > 0, 0 elsewhere
    has_m: np.ndarray     # M > 0
    u_n_centred: np.ndarray

    @classmethod
    def from_points(cls, n, m, d, m_ref: float, n_ref: float) -> "Inputs":
        n, m, d = (np.asarray(v, float) for v in (n, m, d))
        has_m = m > 0
        log_m = np.where(has_m, np.log(np.where(has_m, m, 1.0) / m_ref), 0.0)
        return cls(np.log(n), np.log(d), np.log1p(m / m_ref), log_m, has_m, np.log(n) - np.log(n_ref))


def _sigmoid(s):
    return 1.0 / (1.0 + np.exp(-s))


class Form:
    """One candidate: names, bounds and starts of its memory parameters, its log terms, predict."""

    name = ""
    memory = ("", "")
    memory_bounds: list = []
    memory_starts: list = []
    description = ""

    @property
    def param_names(self) -> tuple[str, ...]:
        return DENSE + self.memory

    @property
    def bounds(self) -> list:
        return DENSE_BOUNDS + self.memory_bounds

    @staticmethod
    def _dense_terms(theta_SQ, x: Inputs):
        """The three Chinchilla terms, each as [z (S, P), {q: ∂z/∂θ_q}] (derivatives broadcast to
        (S, P); the slots not named are zero, which keeps the gradient's cost to the terms' own)."""
        a, b, e, alpha, beta = (theta_SQ[:, i, None] for i in range(5))
        z_n, z_d = a - alpha * x.u_n, b - beta * x.u_d
        z_e = np.broadcast_to(e, z_n.shape).copy()
        return [[z_n, {0: 1.0, 3: -x.u_n}], [z_d, {1: 1.0, 4: -x.u_d}], [z_e, {2: 1.0}]]

    def terms(self, theta_SQ: np.ndarray, x: Inputs) -> list:
        raise NotImplementedError

    def params(self, theta_Q) -> dict[str, float]:
        raise NotImplementedError

    def theta(self, params: dict[str, float]) -> np.ndarray:
        raise NotImplementedError

    def predict(self, params: dict[str, float], n, m, d, m_ref: float, n_ref: float) -> np.ndarray:
        raise NotImplementedError


def dense_params(theta_Q) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta_Q[:5])
    return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": alpha, "beta": beta}


def _dense_theta(params: dict[str, float]) -> list[float]:
    return [np.log(params["A"]), np.log(params["B"]), np.log(params["E"]), params["alpha"], params["beta"]]


def dense_loss(params: dict, n, d) -> np.ndarray:
    """E + A/N^α + B/D^β (broadcasting: params may be arrays of replicates)."""
    return params["E"] + params["A"] * np.asarray(n, float) ** -params["alpha"] \
        + params["B"] * np.asarray(d, float) ** -params["beta"]


class Additive(Form):
    name = "additive"
    memory = ("G", "gamma")
    memory_bounds = [(-20.0, 20.0), (0.0, 5.0)]     # s = logit(G / E), γ
    memory_starts = [(s, g) for s in (-3.0, -1.0, 1.0) for g in (0.3, 1.0, 2.0)]
    description = "E(1-phi) + E phi (1 + M/m_ref)^-gamma + A/N^alpha + B/D^beta, G = phi E"

    def terms(self, theta_SQ, x):
        out = self._dense_terms(theta_SQ, x)
        s, gamma = theta_SQ[:, 5, None], theta_SQ[:, 6, None]
        z_e = out[2][0]
        phi = _sigmoid(s)
        # the floor split in two: E·(1 − φ) stays, E·φ shrinks with the memory
        out[2] = [z_e + np.log(_sigmoid(-s)), {2: 1.0, 5: -phi}]
        out.append([z_e + np.log(phi) - gamma * x.ell, {2: 1.0, 5: 1.0 - phi, 6: -x.ell}])
        return out

    def params(self, theta_Q):
        out = dense_params(theta_Q)
        return {**out, "G": out["E"] * float(_sigmoid(theta_Q[5])), "gamma": float(theta_Q[6])}

    def theta(self, params):
        ratio = min(max(params["G"] / params["E"], 1e-9), 1 - 1e-9)
        return np.array(_dense_theta(params) + [np.log(ratio / (1 - ratio)), params["gamma"]])

    def predict(self, params, n, m, d, m_ref, n_ref):
        shrink = (1.0 + np.asarray(m, float) / m_ref) ** -params["gamma"]
        return dense_loss(params, n, d) - params["G"] * (1.0 - shrink)


class EffectiveParams(Form):
    name = "effective_params"
    memory = ("kappa", "gamma")
    memory_bounds = [(-20.0, 10.0), (0.0, 3.0)]     # k = log κ, γ
    memory_starts = [(k, g) for k in (-2.0, 0.0, 2.0) for g in (0.2, 0.5, 1.0)]
    description = "E + A/(N (1 + kappa (M/m_ref)^gamma))^alpha + B/D^beta"

    def terms(self, theta_SQ, x):
        out = self._dense_terms(theta_SQ, x)
        alpha, k, gamma = theta_SQ[:, 3, None], theta_SQ[:, 5, None], theta_SQ[:, 6, None]
        q = np.where(x.has_m, np.exp(np.minimum(k + gamma * x.log_m, 50.0)), 0.0)
        log_mult, share = np.log1p(q), q / (1.0 + q)
        z_n, dz_n = out[0]
        z_n -= alpha * log_mult
        dz_n[3] = dz_n[3] - log_mult
        dz_n[5] = -alpha * share
        dz_n[6] = dz_n[5] * x.log_m
        return out

    def params(self, theta_Q):
        return {**dense_params(theta_Q), "kappa": float(np.exp(theta_Q[5])), "gamma": float(theta_Q[6])}

    def theta(self, params):
        return np.array(_dense_theta(params) + [np.log(params["kappa"]), params["gamma"]])

    def predict(self, params, n, m, d, m_ref, n_ref):
        m = np.asarray(m, float)
        scaled = np.where(m > 0, m, m_ref) / m_ref  # a safe base where M = 0 (0^0 would be 1)
        mult = 1.0 + np.where(m > 0, params["kappa"] * scaled ** params["gamma"], 0.0)
        return dense_loss(params, np.asarray(n, float) * mult, d)


class Interaction(Form):
    name = "interaction"
    memory = ("delta", "iota")
    memory_bounds = [(-2.0, 5.0), (-2.0, 2.0)]
    memory_starts = [(dl, io) for dl in (0.05, 0.3, 1.0) for io in (-0.1, 0.0, 0.1)]
    description = "E + A/N^alpha (1 + M/m_ref)^-(delta + iota log(N/n_ref)) + B/D^beta"

    def terms(self, theta_SQ, x):
        out = self._dense_terms(theta_SQ, x)
        delta, iota = theta_SQ[:, 5, None], theta_SQ[:, 6, None]
        z_n, dz_n = out[0]
        z_n -= x.ell * (delta + iota * x.u_n_centred)
        dz_n[5] = -x.ell
        dz_n[6] = -x.ell * x.u_n_centred
        return out

    def params(self, theta_Q):
        return {**dense_params(theta_Q), "delta": float(theta_Q[5]), "iota": float(theta_Q[6])}

    def theta(self, params):
        return np.array(_dense_theta(params) + [params["delta"], params["iota"]])

    def predict(self, params, n, m, d, m_ref, n_ref):
        n = np.asarray(n, float)
        exponent = params["delta"] + params["iota"] * np.log(n / n_ref)
        n_term = params["A"] * n ** -params["alpha"] * (1.0 + np.asarray(m, float) / m_ref) ** -exponent
        return params["E"] + n_term + params["B"] * np.asarray(d, float) ** -params["beta"]


FORMS: dict[str, Form] = {f.name: f for f in (Additive(), EffectiveParams(), Interaction())}


def form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"form: expected one of {sorted(FORMS)}, got {name!r}")
    return FORMS[name]
