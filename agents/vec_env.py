"""A vectorised CompressionEnv whose finished episodes are evaluated together.

SB3 steps its environments in lockstep. Every CompressionEnv episode has the same length, so the
episodes of all `n` environments end on the same step: instead of evaluating each candidate when
its env reaches the end (one after another), the env only records the policy, and the vector
env hands all of them to the agent at once (several candidates in flight on a Ray cluster),
then adds each reward to its env's last step.
"""

from __future__ import annotations

from collections.abc import Callable

from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from agents.env import CompressionEnv
from pipeline.core.policy import Policy

EnvFactory = Callable[[Callable[[Policy], float]], CompressionEnv]
"""Builds one CompressionEnv around the `evaluate_fn` it is given."""


class BatchVecEnv(DummyVecEnv):
    """`n` CompressionEnvs; the candidates whose episodes end on one step are scored together.

    Args:
        make_env: Builds each env around its (deferring) `evaluate_fn`.
        n: Number of envs (the evaluator's workers).
        score_many: Policies -> rewards, in order (the agent's batch evaluation).
    """

    def __init__(
        self, make_env: EnvFactory, n: int, score_many: Callable[[list[Policy]], list[float]]
    ) -> None:
        self._ended: list[tuple[int, Policy]] = []  # (env index, policy) of this step
        envs = [make_env(self._deferred(i)) for i in range(n)]
        super().__init__([lambda env=env: env for env in envs])
        self.score_many = score_many

    def _deferred(self, index: int) -> Callable[[Policy], float]:
        def record(policy: Policy) -> float:
            self._ended.append((index, policy))
            return 0.0  # the reward is added once the whole batch is scored

        return record

    def step_wait(self) -> VecEnvStepReturn:
        self._ended = []
        obs, rewards, dones, infos = super().step_wait()
        if self._ended:
            scores = self.score_many([policy for _, policy in self._ended])
            for (index, _), score in zip(self._ended, scores, strict=True):
                rewards[index] += score
        return obs, rewards, dones, infos

    @property
    def episode_length(self) -> int:
        """Steps per episode, the same in every env."""
        return self.envs[0].episode_length  # type: ignore[attr-defined]

    def set_base_policy(self, policy: Policy) -> None:
        """`CompressionEnv.set_base_policy` in every env."""
        for env in self.envs:
            env.set_base_policy(policy)  # type: ignore[attr-defined]
