"""The non-finite guard of the training scripts: a NaN or infinite loss or gradient stops the run loudly, before the
optimiser step and before any checkpoint could store the damage."""
import math


def raise_if_not_finite(step, grad_norm, **terms):
    """Raise FloatingPointError naming ``step`` and every loss term if ``grad_norm`` or a term is not finite.

    Under DDP the gradient norm is computed from the all-reduced gradients, so every process raises together.
    """
    values = {'grad_norm': float(grad_norm), **{name: float(value) for name, value in terms.items()}}
    if all(math.isfinite(value) for value in values.values()):
        return
    raise FloatingPointError(f'non-finite training values at step {step}: '
                             + ', '.join(f'{name} {value:.6g}' for name, value in values.items())
                             + ' (nothing of this step was applied or saved; lower the learning rate or check the '
                             'data)')
