"""Each law recovers known parameters from noisy synthetic data, and degenerate input fails with
a message that names the problem (ValueError in Python, exit code 2 on the command line)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize

from memlayers.platform.cli.main import main
from memlayers.platform.laws.chinchilla import fit_chinchilla
from memlayers.platform.laws.chinchilla import predict as chinchilla_predict
from memlayers.platform.laws.lbfgs import minimize_batch
from memlayers.platform.laws.logfit import PowerSumProblem
from memlayers.platform.laws.power import fit_power_law
from memlayers.platform.laws.recall import fit_recall
from memlayers.platform.laws.recall import predict as recall_predict


def noisy(values, rng, sigma):
    return values * np.exp(rng.normal(0.0, sigma, np.shape(values)))


def test_gradient_is_the_derivative_of_the_objective():
    rng = np.random.default_rng(0)
    problem = PowerSumProblem(u_PK=rng.normal(20, 2, (30, 2)), v_P=rng.normal(1, 0.2, 30), delta=0.05)
    weights_SP = rng.integers(0, 3, (3, 30)).astype(float)
    theta_SQ = np.array([[6.0, 7.0, 0.5, 0.3, 0.35], [3.0, 9.0, 0.2, 0.2, 0.5], [8.0, 4.0, 0.9, 0.4, 0.1]])
    f_S, g_SQ = problem.fun_grad(theta_SQ, weights_SP)
    for s in range(3):
        def one(theta, s=s):
            return problem.fun_grad(theta[None, :], weights_SP[s:s + 1])[0][0]
        np.testing.assert_allclose(g_SQ[s], approx_fprime(theta_SQ[s], one, 1e-7), rtol=1e-4, atol=1e-7)
        assert f_S[s] == pytest.approx(one(theta_SQ[s]))


def test_batched_lbfgs_agrees_with_scipy_and_respects_bounds():
    def rosen(x_SQ, rows):
        a, b = x_SQ[:, 0], x_SQ[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g

    starts = np.array([[-1.2, 1.0], [2.0, 2.0], [0.0, -1.0], [-2.0, 3.0]])
    res = minimize_batch(rosen, starts, gtol=1e-9, ftol=0)
    np.testing.assert_allclose(res.x_SQ, 1.0, atol=1e-5)
    assert res.converged_S.all()
    bounded = minimize_batch(rosen, starts, lower_Q=np.array([-3, -3]), upper_Q=np.array([0.5, 3]), gtol=1e-9, ftol=0)
    ref = minimize(lambda x: rosen(x[None], None)[0][0], [0.0, 0.0], bounds=[(-3, 0.5), (-3, 3)], method="L-BFGS-B")
    np.testing.assert_allclose(bounded.x_SQ, np.tile(ref.x, (4, 1)), atol=1e-4)
    assert (bounded.x_SQ[:, 0] <= 0.5).all()


def test_chinchilla_recovers_known_parameters():
    rng = np.random.default_rng(1)
    true = {"A": 400.0, "B": 1800.0, "E": 1.7, "alpha": 0.34, "beta": 0.28}
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 7)))
    loss = noisy(chinchilla_predict(true, n, d), rng, 0.002)
    fit = fit_chinchilla(n, d, loss)
    assert fit.params["alpha"] == pytest.approx(true["alpha"], abs=0.02)
    assert fit.params["beta"] == pytest.approx(true["beta"], abs=0.02)
    assert fit.params["E"] == pytest.approx(true["E"], rel=0.02)
    assert fit.n_points == 56


@pytest.mark.parametrize("law, exponent, x", [("compute", "alpha", np.geomspace(1e15, 1e19, 10)),
                                              ("memory", "gamma", np.geomspace(1024, 4 * 1024**2, 9))])
def test_power_law_recovers_known_parameters_with_intervals(law, exponent, x):
    rng = np.random.default_rng(2)
    true = {"A": 60.0 if law == "compute" else 4.0, "E": 1.9, exponent: 0.11 if law == "compute" else 0.35}
    y = noisy(true["E"] + true["A"] * x ** -true[exponent], rng, 0.002)
    fit = fit_power_law(x, y, law=law, bootstrap=100, seed=3)
    assert fit.params[exponent] == pytest.approx(true[exponent], rel=0.1)
    assert fit.params["E"] == pytest.approx(true["E"], rel=0.03)
    assert fit.params["A"] == pytest.approx(true["A"], rel=0.5)
    np.testing.assert_allclose(fit.predict(x), true["E"] + true["A"] * x ** -true[exponent], rtol=0.006)
    low, high = fit.intervals[exponent]
    assert low <= fit.params[exponent] <= high and high > low
    assert fit.inputs == (["C"] if law == "compute" else ["M"])


def test_recall_logistic_recovers_known_curve():
    rng = np.random.default_rng(4)
    true = {"floor": 0.15, "ceiling": 0.92, "slope": 1.4, "log_m_mid": float(np.log(3e4))}
    m = np.repeat(np.geomspace(1e3, 1e6, 7), 3)
    r = np.clip(recall_predict(true, m) + rng.normal(0, 0.01, m.size), 0, 1)
    fit = fit_recall(m, r, bootstrap=50, seed=0)
    assert fit.params["floor"] == pytest.approx(true["floor"], abs=0.03)
    assert fit.params["ceiling"] == pytest.approx(true["ceiling"], abs=0.03)
    assert fit.params["log_m_mid"] == pytest.approx(true["log_m_mid"], abs=0.2)
    assert fit.params["slope"] == pytest.approx(true["slope"], rel=0.2)
    grid = np.geomspace(10, 1e8, 50)
    assert np.all(np.diff(fit.predict(grid)) >= 0)  # monotone
    fixed = fit_recall(m, r, floor=0.15)
    assert fixed.params["floor"] == 0.15 and fixed.details["floor_fixed"]


@pytest.mark.parametrize("call, message", [
    (lambda: fit_chinchilla([1e8, 2e8, 3e8, 4e8], [1e9, 2e9, 3e9, 4e9], [3, 2.9, 2.8, 2.7]), "need at least 5"),
    (lambda: fit_chinchilla([1e8] * 6, np.geomspace(1e9, 1e11, 6), [3, 2.9, 2.8, 2.7, 2.6, 2.5]),
     "N (model size) takes 1"),
    (lambda: fit_chinchilla(np.geomspace(1e8, 1e9, 6), np.geomspace(1e9, 1e11, 6), [3, 2.9, -1, 2.7, 2.6, 2.5]),
     "not positive"),
    (lambda: fit_chinchilla(np.geomspace(1e8, 1e9, 6), np.geomspace(1e9, 1e11, 6),
                            [3, 2.9, np.nan, 2.7, 2.6, 2.5]), "NaN"),
    (lambda: fit_power_law([1e15, 1e16], [3.0, 2.8]), "need at least 3"),
    (lambda: fit_power_law([1e15, 1e15, 1e16, 1e16], [3.0, 2.9, 2.8, 2.7]), "takes 2 distinct"),
    (lambda: fit_power_law([1e15, 1e16, 1e17], [3.0, 0.0, 2.7], law="memory"), "not positive"),
    (lambda: fit_recall([1e3, 1e4, 1e5, 1e6], [0.1, 0.5, 1.2, 0.9]), "outside [0, 1]"),
    (lambda: fit_recall([1e3, 1e4, 1e5], [0.1, 0.5, 0.9]), "need at least 4"),
    (lambda: fit_power_law([1e15, 1e16, 1e17], [3.0, 2.9, 2.8], law="size"), "law"),
])
def test_degenerate_input_fails_clearly(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call()


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_cli_degenerate_input_exits_2_with_message(tmp_path, capsys):
    single = write_csv(tmp_path / "single.csv", ["N", "C", "loss"],
                       [(1e8, 10.0 ** k, 3 - 0.1 * k) for k in range(15, 21)])
    code = main(["fit", "--csv", str(single), "--law", "chinchilla", "--n", "N", "--c", "C", "--loss", "loss"])
    err = capsys.readouterr().err
    assert code == 2 and "model size" in err and "distinct" in err
    nan = write_csv(tmp_path / "nan.csv", ["C", "loss"], [(1e15, 3.0), (1e16, ""), (1e17, 2.7), (1e18, 2.6)])
    code = main(["fit", "--csv", str(nan), "--law", "compute", "--c", "C", "--loss", "loss"])
    assert code == 2 and "NaN" in capsys.readouterr().err
    code = main(["fit", "--csv", str(nan), "--law", "compute", "--c", "flops", "--loss", "loss"])
    assert code == 2 and "'flops'" in capsys.readouterr().err
    code = main(["fit", "--csv", str(nan), "--law", "memory", "--loss", "loss"])
    assert code == 2 and "--m" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: neither --csv nor --study
        main(["fit", "--law", "compute"])
    assert exit_info.value.code == 2


def test_power_law_refuses_inputs_that_span_too_little():
    flops = [6.69e11, 6.72e11, 6.78e11, 6.69e11, 6.72e11, 6.78e11]
    with pytest.raises(ValueError, match="spans only 1.01x"):
        fit_power_law(flops, [0.77, 0.61, 0.60, 0.67, 0.62, 0.61], law="compute")


def test_power_law_flags_an_exponent_at_its_bound():
    # a cliff between the first two sizes and flat after: only the largest exponent fits
    fit = fit_power_law([256, 1024, 4096, 256, 1024, 4096], [1.66, 0.36, 0.62, 0.86, 0.42, 0.72], law="memory")
    assert "sits at its bound" in fit.details["warning"]
    smooth = fit_power_law([1e3, 4e3, 1.6e4, 6.4e4], [2.0 + 5 * m ** -0.4 for m in (1e3, 4e3, 1.6e4, 6.4e4)],
                           law="memory")
    assert "warning" not in smooth.details
