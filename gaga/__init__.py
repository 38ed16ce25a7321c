"""GAGA (Gaussianity-Aware Gaussian Approximation): dataset variance, the Gaussianity
evaluator (KS + k-NN mutual information) and the T* estimators.

Modules: data (centred, normalised features), schedule (gamma table, v_t), variance
(per-molecule statistics), stat_tests (batched KS and KSG MI), gaussianity (the per-molecule
tests), gaussianity_run (selection, workers, CSVs), step_estimation (T*), plots, cli.
The paper's dataset-level evaluator: evaluator_paper (T_ID, T_DS, T* = max), paper_stats
(tree KSG, weighted KS, H^(K)), plots_paper, paper_cli, synthetic (Gaussian / non-Gaussian controls, GEOM-shaped molecules).
"""
