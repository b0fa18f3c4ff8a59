// llama2.c's run.c as a library (TESTING leaves out its main): the loss of a token sequence and
// a greedy continuation, for scripts/stories260k_reference.py.
//   reference CHECKPOINT STEPS N_PROMPT PROMPT_IDS... STORY_IDS...
#define TESTING
#include "run.c"

int main(int argc, char** argv) {
  Transformer t;
  build_transformer(&t, argv[1]);
  const int steps = atoi(argv[2]), n_prompt = atoi(argv[3]);
  const int n_story = argc - 4 - n_prompt;
  int* ids = malloc(sizeof(int) * (argc - 4));
  for (int i = 0; i < argc - 4; ++i) ids[i] = atoi(argv[4 + i]);
  const int* story = ids + n_prompt;
  // Mean negative log-likelihood of each story token after the first, in double.
  double nll = 0;
  for (int pos = 0; pos + 1 < n_story; ++pos) {
    float* logits = forward(&t, story[pos], pos);
    double max = logits[0], sum = 0;
    for (int v = 1; v < t.config.vocab_size; ++v) max = logits[v] > max ? logits[v] : max;
    for (int v = 0; v < t.config.vocab_size; ++v) sum += exp(logits[v] - max);
    nll -= logits[story[pos + 1]] - max - log(sum);
  }
  printf("{\"loss\": %.10f, \"tokens\": %d, \"greedy\": [", nll / (n_story - 1), n_story - 1);
  // Greedy: feed the prompt, then the argmax, `steps` times.
  int token = ids[0];
  for (int pos = 0; pos < n_prompt + steps - 1; ++pos) {
    float* logits = forward(&t, token, pos);
    if (pos + 1 < n_prompt) {
      token = ids[pos + 1];
      continue;
    }
    token = sample_argmax(logits, t.config.vocab_size);
    printf("%s%d", pos + 1 == n_prompt ? "" : ", ", token);
  }
  printf("]}\n");
  free_transformer(&t);
  free(ids);
  return 0;
}
