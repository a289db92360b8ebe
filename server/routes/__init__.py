"""One router per resource. `app.build_app` mounts them all under /api/v1, behind the API-key check (except
health).

client_config, health, capabilities, sessions, telemetry, retrieve: bootstrap, sessions and futures.
models.py: create_model, get_info, unload_model.
training.py: forward_backward (proto or JSON), forward (legacy JSON), optim_step.
checkpoints.py: save_weights*, load_weights, weights_info, and the training_runs / checkpoints REST resources.
sampling.py: create_sampling_session, samplers/{id}, join_sampling_session, asample, cancel_future.
"""
