"""REST API for a job's search trials (issue 20): GET /api/v1/jobs/<id>/trials, owner-only."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from ..models import FineTuneJob
from ..search import trials_payload


class SearchTrialSerializer(serializers.Serializer):
    number = serializers.IntegerField(help_text="Optuna trial number, from 0")
    params = serializers.DictField(help_text="learning_rate, rank, alpha_ratio, target_set, method, micro_batch")
    state = serializers.ChoiceField(["running", "complete", "pruned", "failed"])
    score = serializers.FloatField(allow_null=True, help_text="validation score of a complete trial")
    metric = serializers.CharField(help_text="exact_match, token_f1 or eval_loss (lower is better)")
    curve = serializers.ListField(child=serializers.ListField(child=serializers.FloatField()),
                                  help_text="[[step, validation loss], ...]")
    duration = serializers.FloatField(help_text="seconds")
    reason = serializers.CharField(help_text="why it was pruned or failed")
    worker = serializers.CharField()
    winner = serializers.BooleanField()


class SearchBudgetSerializer(serializers.Serializer):
    summary = serializers.CharField(allow_null=True)
    seconds = serializers.FloatField(allow_null=True)
    max_trials = serializers.IntegerField(allow_null=True)
    expected_trials = serializers.IntegerField(allow_null=True)
    trial_steps = serializers.IntegerField(allow_null=True)
    final_seconds_estimate = serializers.FloatField(allow_null=True)
    tokens_per_second = serializers.FloatField(allow_null=True)
    tokens_per_second_source = serializers.CharField(allow_null=True)


class JobTrialsSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    active = serializers.BooleanField()
    enabled = serializers.BooleanField(help_text="whether this job searches before its final training")
    budget = SearchBudgetSerializer()
    done = serializers.BooleanField(help_text="the search is over and its winner is the job's plan")
    winner = serializers.IntegerField(allow_null=True)
    trials = SearchTrialSerializer(many=True)


class JobTrials(APIView):
    @extend_schema(responses={200: JobTrialsSerializer},
                   summary="The job's hyperparameter search: budget, every trial with its curve, the winner")
    def get(self, request, pk):
        return Response(trials_payload(FineTuneJob.objects.owned_by(request.user).get_or_404(pk)))
