"""The book's fixed method colours."""
from fso_lib.plotting import METHOD_COLORS, method_color

# "gd" is plain full-batch gradient descent: the same method as "sgd", drawn in the same colour.
ALIASES = {"gd": "sgd"}


def test_every_method_has_its_own_colour():
    owners = {}
    for name, colour in METHOD_COLORS.items():
        owners.setdefault(colour.lower(), []).append(ALIASES.get(name, name))
    shared = {colour: names for colour, names in owners.items() if len(set(names)) > 1}
    assert not shared, f"methods that would be drawn alike: {shared}"


def test_unknown_method_gets_the_neutral_colour():
    assert method_color("no_such_method") == "#444444"
    assert method_color("kfac") == METHOD_COLORS["kfac"]
