// A small client of llama.cpp's C API (include/llama.h) for bench/verify_gguf_llamacpp.py: token ids in,
// token ids out. llama.cpp's own tools print text; to compare its tokenizer and its greedy decoding with
// ours id by id, we need the ids themselves. bench/verify_gguf_llamacpp.py compiles this file against
// the llama.cpp it builds.
//
//   llamacpp_check MODEL.gguf tokenize TEXTS.hex
//       TEXTS.hex holds one text per line, written as the hex of its UTF-8 bytes (so any text fits on a
//       line). Prints one line of ids per text: special tokens such as <end_of_turn> are parsed, no
//       <bos> is added (our encode adds none either).
//   llamacpp_check MODEL.gguf greedy N LOGITS.f32 ID ID ...
//       Feeds the prompt ids, then picks the most likely token N times (argmax, as our temperature 0),
//       going on past end-of-generation tokens. Prints the N ids on one line, and writes every step's
//       logits (N x n_vocab float32) to LOGITS.f32 so that the script can measure how close they are.
//       One thread, a float32 KV cache and no flash attention: llama.cpp's plainest arithmetic,
//       nearest to ours (its defaults, an fp16 cache and flash attention, round more).

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int tokenize(const llama_vocab * vocab, const char * path) {
    std::ifstream in(path);
    if (!in) {
        fprintf(stderr, "cannot read %s\n", path);
        return 1;
    }
    std::string line;
    while (std::getline(in, line)) {
        std::string text;
        for (size_t i = 0; i + 1 < line.size(); i += 2) {
            text.push_back((char) std::stoi(line.substr(i, 2), nullptr, 16));
        }
        // a first call with no room returns minus the number of tokens needed
        int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, /*add_special*/ false, /*parse_special*/ true);
        std::vector<llama_token> ids(n);
        if (n > 0 && llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), n, false, true) != n) {
            fprintf(stderr, "llama_tokenize failed\n");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            printf(i ? " %d" : "%d", ids[i]);
        }
        printf("\n");
    }
    return 0;
}

static int greedy(llama_model * model, int n_new, const char * logits_path, std::vector<llama_token> prompt) {
    llama_context_params params = llama_context_default_params();
    params.n_ctx = (uint32_t) (prompt.size() + n_new);
    params.n_batch = params.n_ctx;
    params.n_threads = params.n_threads_batch = 1;
    params.type_k = params.type_v = GGML_TYPE_F32;
    params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, params);
    if (!ctx) {
        fprintf(stderr, "cannot create a llama.cpp context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * logits_file = fopen(logits_path, "wb");
    if (!logits_file) {
        fprintf(stderr, "cannot write %s\n", logits_path);
        return 1;
    }
    llama_batch batch = llama_batch_get_one(prompt.data(), (int32_t) prompt.size());
    llama_token next = 0;
    for (int step = 0; step < n_new; step++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);  // the last position's
        fwrite(logits, sizeof(float), n_vocab, logits_file);
        next = 0;
        for (int i = 1; i < n_vocab; i++) {
            if (logits[i] > logits[next]) {
                next = i;  // the first of equal maxima, as torch.argmax
            }
        }
        printf(step ? " %d" : "%d", next);
        batch = llama_batch_get_one(&next, 1);
    }
    printf("\n");
    fclose(logits_file);
    llama_free(ctx);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf tokenize TEXTS.hex | %s MODEL.gguf greedy N LOGITS.f32 ID...\n", argv[0], argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    const std::string mode = argv[2];
    llama_model_params model_params = llama_model_default_params();
    model_params.vocab_only = mode == "tokenize";
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (!model) {
        fprintf(stderr, "llama.cpp cannot load %s\n", argv[1]);
        return 1;
    }
    int status = 2;
    if (mode == "tokenize") {
        status = tokenize(llama_model_get_vocab(model), argv[3]);
    } else if (mode == "greedy" && argc >= 6) {
        std::vector<llama_token> prompt;
        for (int i = 5; i < argc; i++) {
            prompt.push_back(atoi(argv[i]));
        }
        status = greedy(model, atoi(argv[3]), argv[4], prompt);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode.c_str());
    }
    llama_model_free(model);
    llama_backend_free();
    return status;
}
