"""The multiply-add count behind the speed goals (``fso_lib.costs.amortized_update_multiply_adds``, issue 11),
against a count made by hand for a 6-4-3 network."""
from fso_lib.costs import amortized_update_multiply_adds as amortized_multiply_adds
from fso_lib.optim.acp import acp_product_order
from fso_lib.optim.inverse import inverse_form
from fso_lib.optim.kfac import kfac_product_order


def test_counts_of_a_small_network_by_hand():
    sizes, n, m = (6, 4, 3), 2, 2
    # the branches the hand count below assumes
    assert [kfac_product_order(n, i, o, False) for i, o in ((6, 4), (4, 3))] == [("batch", "batch")] * 2
    assert [acp_product_order(n, i, o, False) for i, o in ((6, 4), (4, 3))] == ["batch", "batch"]
    assert (inverse_form(m, 6), inverse_form(m, 4)) == ("woodbury", "dense")
    passes = 2 * (24 + 12) + 2 * 12           # forward (both layers) + input gradient (second layer only)
    sgd = passes + 2 * (24 + 12)              # + weight gradients
    acp_step = (2 * 6 * 2 + 2 * 2 * 6 + 4 * 2 * 6) + (2 * 4 * 4 + 3 * 2 * 4)   # Woodbury / dense, then gᵀ(·)
    acp_refresh = 2 * 36 + (2 * 36 + 2 * 16) + (2 * 2 * 6 + 2 ** 3) + 4 ** 3    # forward, covariances, inverses
    kfac_step = (2 * 4 * 4 + 2 * 7 * 7 + 4 * 2 * 7) + (2 * 3 * 3 + 2 * 5 * 5 + 3 * 2 * 5)
    kfac_statistics = 2 * 36 + 2 * 12 + 2 * ((7 ** 2 + 4 ** 2) + (5 ** 2 + 3 ** 2))
    kfac_inversions = 7 ** 3 + 4 ** 3 + 5 ** 3 + 3 ** 3
    counts = amortized_multiply_adds(n, m, sizes, statistics_period=1, inverse_period=1, amortization_period=1)
    assert counts == {"SGD": sgd, "ACP": passes + acp_step + acp_refresh,
                      "K-FAC": passes + kfac_step + kfac_statistics + kfac_inversions}
    # amortization divides the refresh work only
    amortized = amortized_multiply_adds(n, m, sizes, statistics_period=3, inverse_period=7, amortization_period=5)
    assert amortized["K-FAC"] == passes + kfac_step + kfac_statistics // 3 + kfac_inversions // 7
    assert amortized["ACP"] == passes + acp_step + acp_refresh // 5
