"""absl entry points: python -m experiments.{mnist,fashion_mnist,cifar10,imagenette}."""
