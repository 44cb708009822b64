"""One run of kdx, top to bottom; each step is its own module::

    compose   (Hydra: the command line, a resumed run's own config, models named by their override)
      -> validate  (the config alone judged: no data made, no teacher trained on a bad value)
      -> build     (one builder: datamodule, student, teacher, method, module, trainer factory;
                    the teacher provided, trained by this same pipeline when ``teacher.ckpt=auto``,
                    and checked)
      -> fit       (callbacks, loggers, ``Trainer.fit``)
      -> evaluate  (test figures of the last and of the best checkpoint)
      -> record    (metrics.json through :mod:`kdx.record`)

:func:`kdx.pipeline.run.run` chains them; :func:`kdx.pipeline.run.run_job` turns a failure into a
failed record and an exit code. ``kdx-train`` (:mod:`kdx.train`), ``kdx-eval`` and ``kdx-bench``
are thin entry points over these steps.
"""
