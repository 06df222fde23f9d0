"""Downstream evaluation of trained checkpoints through EleutherAI's lm-evaluation-harness.

    trained = load_trained(checkpoint_dir)                     # loading.py (weights_only=True)
    lm = MemlayersLM(trained.model, trained.tokenizer)          # lm_adapter.py: an lm_eval LM
    scores = evaluate_model(trained, ["nq_open", "triviaqa"], data_dir=DIR)   # runner.py

Tasks (tasks.py): nq_open and triviaqa from local JSONL files with the harness's prompts and
normalisation (metrics.py adds TriviaQA's token F1 and the answer NLL), facts_qa over the
synthetic world's QA split, and any installed harness task by name. `targets.py` turns a
checkpoint folder, an MLflow run id or a study into what to evaluate; `stage.py` is the study's
evaluation stage.
"""
