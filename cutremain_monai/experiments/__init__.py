"""Study runners that the CLI calls: comparisons, cross-validation and the gamma curve, the shortcut test,
adversarial erasing, PSL, background learning, severity CV / baselines / guidance, self-training, localisation.

Each runs one or more bundles through :mod:`cutremain_monai.engines.bundle` and writes its tables; nothing in a
bundle imports this package."""
