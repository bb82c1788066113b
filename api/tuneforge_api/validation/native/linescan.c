/* The validator's first look at a block of JSONL lines, in C (module
 * tuneforge_api.validation._linescan; see fast.py, which uses it).
 *
 * It proves common chat lines valid without building a Python object per line:
 *
 *     {"messages": [{"role": R, "content": "text", ...}, ...]}
 *
 * with R one of system/developer/user/assistant/tool, known keys once each (name, an answer's
 * weight 0 or 1, an answer's tool_calls, a tool result's tool_call_id that answers an earlier
 * call), text that is valid UTF-8 and not blank, and at least one trained answer. Every
 * other line (other formats, content parts, escaped call ids, any doubt) is UNSURE and goes to
 * the msgspec path and then the rules, which name problems. So the scanner never decides a line
 * differently from those paths; tests compare them.
 *
 * Per line it also gives what the caller's books need: the xxh3 key of the stripped line (the
 * same value as xxhash.xxh3_64_intdigest, so keys agree with the other paths), its stripped
 * size, and the longest line. The per-line pass runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define XXH_INLINE_ALL
#include "xxhash.h"

typedef const unsigned char *cursor;

enum { UNSURE = 0, CHAT = 1, CHAT_OR_PROMPT = 2 };

typedef struct {
    Py_ssize_t start, stop;             /* the line, without its newline */
    Py_ssize_t text_start, text_stop;   /* the line stripped as bytes.strip() strips */
    uint64_t key;
    unsigned char kind;
} Line;

static inline int is_json_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* bytes.strip()'s whitespace: space and \t \n \v \f \r. */
static inline int is_strip_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* str.isspace() of one code point (the set str.strip() strips; U+001C-U+001F included). */
static inline int is_space_code(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

static inline cursor skip_space(cursor p, cursor end) {
    while (p < end && is_json_space(*p)) p++;
    return p;
}

/* p at a literal's first byte: the byte after it, or NULL when the literal is not there. */
static inline cursor expect(cursor p, cursor end, const char *literal, Py_ssize_t n) {
    return (end - p >= n && memcmp(p, literal, (size_t)n) == 0) ? p + n : NULL;
}

#define EXPECT(p, end, lit) expect((p), (end), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* After ws, the byte c, then ws: the byte after; NULL when c is not there. */
static inline cursor punct(cursor p, cursor end, unsigned char c) {
    p = skip_space(p, end);
    if (p >= end || *p != c) return NULL;
    return skip_space(p + 1, end);
}

/* One UTF-8 sequence that starts at p (a byte >= 0x80), strictly as Python decodes: no overlong
 * forms, no surrogates, nothing above U+10FFFF. The byte after it (*code: its code point), or
 * NULL. */
static cursor utf8_sequence(cursor p, cursor end, uint32_t *code) {
    unsigned c = p[0], lo = 0x80, hi = 0xBF;
    Py_ssize_t n;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return NULL;
    }
    if (end - p < n || p[1] < lo || p[1] > hi) return NULL;
    *code = c & (0x7Fu >> n);
    for (Py_ssize_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return NULL;
        *code = (*code << 6) | (p[i] & 0x3Fu);
    }
    return p + n;
}

static inline int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 0x20;
    return (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
}

/* A string's body, p just after its opening quote: the byte after the closing quote, or NULL
 * when the string is invalid or not plain. *visible tells whether it holds a character that is
 * not whitespace as str.isspace() sees it (is_space_code), raw or escaped, which proves that the
 * text is neither empty nor blank. *escaped tells whether it holds an escape. */
static cursor scan_string(cursor p, cursor end, int *visible, int *escaped) {
    int seen = 0;
    for (;;) {
#if defined(__SSE2__)
        /* 16 bytes at a time while they are plain: no quote, backslash, control byte or
         * non-ASCII byte (signed, those last two are both below 0x20). */
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            __m128i special = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')), _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))),
                _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)));
            unsigned stops = (unsigned)_mm_movemask_epi8(special);
            unsigned spaces = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')));
            unsigned plain = stops ? ((1u << __builtin_ctz(stops)) - 1u) : 0xFFFFu;
            if ((spaces & plain) != plain) seen = 1;
            if (stops) {
                p += __builtin_ctz(stops);
                break;
            }
            p += 16;
        }
#endif
        if (p >= end) return NULL;
        unsigned c = *p;
        if (c == '"') {
            *visible = seen;
            return p + 1;
        }
        if (c == '\\') {
            *escaped = 1;
            if (end - p < 2) return NULL;
            unsigned e = p[1];
            if (e == '"' || e == '\\' || e == '/' || e == 'b') {
                seen = 1;
                p += 2;
            } else if (e == 'f' || e == 'n' || e == 'r' || e == 't') {
                p += 2;
            } else if (e == 'u') {
                if (end - p < 6) return NULL;
                int code = 0;
                for (int i = 2; i < 6; i++) {
                    int h = hex_value(p[i]);
                    if (h < 0) return NULL;
                    code = code * 16 + h;
                }
                if (code >= 0xD800 && code <= 0xDFFF) return NULL; /* surrogates: the rules decide */
                seen |= !is_space_code((uint32_t)code);
                p += 6;
            } else {
                return NULL;
            }
        } else if (c < 0x20) {
            return NULL;
        } else if (c < 0x80) {
            seen |= c != ' ';
            p++;
        } else {
            uint32_t code = 0;
            p = utf8_sequence(p, end, &code);
            if (p == NULL) return NULL;
            seen |= !is_space_code(code);
        }
    }
}

/* A string value at p (its opening quote), as scan_string; NULL when p is not a string. */
static inline cursor string_value(cursor p, cursor end, int *visible, int *escaped) {
    return (p < end && *p == '"') ? scan_string(p + 1, end, visible, escaped) : NULL;
}

/* A call id's raw bytes; ids are compared as bytes, so one with an escape is left to the rules. */
typedef struct {
    cursor at;
    Py_ssize_t size;
} CallId;

#define MAX_CALL_IDS 64

typedef struct {
    CallId ids[MAX_CALL_IDS];
    int n;
} CallIds;

/* A non-empty id without escapes at p: the byte after it, or NULL. */
static cursor id_value(cursor p, cursor end, CallId *id) {
    int visible = 0, escaped = 0;
    cursor q = string_value(p, end, &visible, &escaped);
    if (q == NULL || escaped || q - p < 3) return NULL;
    *id = (CallId){p + 1, q - p - 2};
    return q;
}

/* After a member's value: the byte after a ',' (*closed = 0) or the closing c (*closed = 1). */
static inline cursor next_member(cursor p, cursor end, unsigned char c, int *closed) {
    p = skip_space(p, end);
    if (p >= end || (*p != ',' && *p != c)) return NULL;
    *closed = *p == c;
    return skip_space(p + 1, end);
}

/* {"name": non-empty string, "arguments": string}, p at its '{'. */
static cursor scan_function(cursor p, cursor end) {
    int has_name = 0, has_arguments = 0, closed = 0;
    p = skip_space(p + 1, end);
    while (!closed) {
        int visible = 0, escaped = 0;
        cursor q, value;
        if ((q = EXPECT(p, end, "\"name\"")) != NULL && !has_name) {
            has_name = 1;
            if ((value = punct(q, end, ':')) == NULL) return NULL;
            if ((p = string_value(value, end, &visible, &escaped)) == NULL || p - value < 3) return NULL;
        } else if ((q = EXPECT(p, end, "\"arguments\"")) != NULL && !has_arguments) {
            has_arguments = 1;
            if ((p = punct(q, end, ':')) == NULL || (p = string_value(p, end, &visible, &escaped)) == NULL)
                return NULL;
        } else {
            return NULL;
        }
        if ((p = next_member(p, end, '}', &closed)) == NULL) return NULL;
    }
    return (has_name && has_arguments) ? p : NULL;
}

/* One tool call, p at its '{': {"id": id, "type": "function" (optional), "function": {...}}. */
static cursor scan_call(cursor p, cursor end, CallIds *ids) {
    int has_id = 0, has_type = 0, has_function = 0, closed = 0;
    p = skip_space(p + 1, end);
    while (!closed) {
        cursor q;
        if ((q = EXPECT(p, end, "\"id\"")) != NULL && !has_id) {
            has_id = 1;
            if (ids->n == MAX_CALL_IDS || (p = punct(q, end, ':')) == NULL) return NULL;
            if ((p = id_value(p, end, &ids->ids[ids->n])) == NULL) return NULL;
            ids->n++;
        } else if ((q = EXPECT(p, end, "\"type\"")) != NULL && !has_type) {
            has_type = 1;
            if ((p = punct(q, end, ':')) == NULL || (p = EXPECT(p, end, "\"function\"")) == NULL) return NULL;
        } else if ((q = EXPECT(p, end, "\"function\"")) != NULL && !has_function) {
            has_function = 1;
            if ((p = punct(q, end, ':')) == NULL || p >= end || *p != '{') return NULL;
            if ((p = scan_function(p, end)) == NULL) return NULL;
        } else {
            return NULL;
        }
        if ((p = next_member(p, end, '}', &closed)) == NULL) return NULL;
    }
    return (has_id && has_function) ? p : NULL;
}

/* A non-empty list of tool calls, p at its '['. */
static cursor scan_tool_calls(cursor p, cursor end, CallIds *ids) {
    int closed = 0;
    p = skip_space(p + 1, end);
    while (!closed) {
        if (p >= end || *p != '{' || (p = scan_call(p, end, ids)) == NULL) return NULL;
        if ((p = next_member(p, end, ']', &closed)) == NULL) return NULL;
    }
    return p;
}

static int answers_a_call(const CallIds *ids, CallId id) {
    for (int i = 0; i < ids->n; i++)
        if (ids->ids[i].size == id.size && memcmp(ids->ids[i].at, id.at, (size_t)id.size) == 0) return 1;
    return 0;
}

enum { ROLE_NONE, ROLE_PROMPT, ROLE_ANSWER, ROLE_TOOL }; /* system, developer and user prompt */
enum { KEY_ROLE = 1, KEY_CONTENT = 2, KEY_NAME = 4, KEY_WEIGHT = 8, KEY_TOOL_CALLS = 16, KEY_TOOL_CALL_ID = 32 };

typedef struct {
    int role, trained;
} Message;

/* The key at p: one of KEY_*, with q just after it; 0 for any other key. */
static int message_key(cursor p, cursor end, cursor *q) {
    if ((*q = EXPECT(p, end, "\"role\"")) != NULL) return KEY_ROLE;
    if ((*q = EXPECT(p, end, "\"content\"")) != NULL) return KEY_CONTENT;
    if ((*q = EXPECT(p, end, "\"name\"")) != NULL) return KEY_NAME;
    if ((*q = EXPECT(p, end, "\"weight\"")) != NULL) return KEY_WEIGHT;
    if ((*q = EXPECT(p, end, "\"tool_calls\"")) != NULL) return KEY_TOOL_CALLS;
    if ((*q = EXPECT(p, end, "\"tool_call_id\"")) != NULL) return KEY_TOOL_CALL_ID;
    return 0;
}

static cursor role_value(cursor p, cursor end, int *role) {
    cursor q;
    if ((q = EXPECT(p, end, "\"assistant\"")) != NULL) *role = ROLE_ANSWER;
    else if ((q = EXPECT(p, end, "\"user\"")) != NULL || (q = EXPECT(p, end, "\"system\"")) != NULL ||
             (q = EXPECT(p, end, "\"developer\"")) != NULL)
        *role = ROLE_PROMPT;
    else if ((q = EXPECT(p, end, "\"tool\"")) != NULL) *role = ROLE_TOOL;
    return q; /* NULL: a role to name as invalid, or one spelled with escapes */
}

/* One message, p at its '{': the byte after its '}', or NULL. Its call ids join ``ids``. */
static cursor scan_message(cursor p, cursor end, CallIds *ids, Message *message) {
    int keys = 0, text = 0, weight = 1, closed = 0, role = ROLE_NONE;
    CallId result = {NULL, 0};
    p = skip_space(p + 1, end);
    while (!closed) {
        cursor q;
        int key = message_key(p, end, &q), visible = 0, escaped = 0;
        if (key == 0 || (keys & key) || (p = punct(q, end, ':')) == NULL) return NULL;
        keys |= key;
        switch (key) {
        case KEY_ROLE:
            p = role_value(p, end, &role);
            break;
        case KEY_CONTENT: /* text, or null where an answer calls tools ("" is left to the rules) */
            if ((q = EXPECT(p, end, "null")) != NULL) {
                p = q;
            } else {
                p = string_value(p, end, &visible, &escaped);
                text = visible;
                if (p != NULL && !visible) return NULL;
            }
            break;
        case KEY_NAME:
            p = string_value(p, end, &visible, &escaped);
            break;
        case KEY_WEIGHT:
            if (p >= end || (*p != '0' && *p != '1')) return NULL;
            weight = *p++ == '1';
            break;
        case KEY_TOOL_CALLS:
            p = (p < end && *p == '[') ? scan_tool_calls(p, end, ids) : NULL;
            break;
        default: /* KEY_TOOL_CALL_ID */
            p = id_value(p, end, &result);
            break;
        }
        if (p == NULL || (p = next_member(p, end, '}', &closed)) == NULL) return NULL;
    }
    if (role == ROLE_NONE) return NULL;
    if (role != ROLE_ANSWER && (keys & (KEY_WEIGHT | KEY_TOOL_CALLS))) return NULL;
    if ((role == ROLE_TOOL) != ((keys & KEY_TOOL_CALL_ID) != 0)) return NULL;
    if (role == ROLE_TOOL && !answers_a_call(ids, result)) return NULL;
    if (!text && !(role == ROLE_ANSWER && (keys & KEY_TOOL_CALLS))) return NULL;
    message->role = role;
    message->trained = role == ROLE_ANSWER && weight;
    return p;
}

/* The kind of one stripped line. */
static unsigned char classify_line(cursor p, cursor end) {
    int trained = 0, closed = 0;
    Message message = {ROLE_NONE, 0};
    CallIds ids;
    ids.n = 0;
    if (p >= end || *p != '{') return UNSURE;
    p = skip_space(p + 1, end);
    if ((p = EXPECT(p, end, "\"messages\"")) == NULL || (p = punct(p, end, ':')) == NULL) return UNSURE;
    if (p >= end || *p != '[') return UNSURE;
    p = skip_space(p + 1, end);
    while (!closed) {
        if (p >= end || *p != '{' || (p = scan_message(p, end, &ids, &message)) == NULL) return UNSURE;
        trained |= message.trained;
        if ((p = next_member(p, end, ']', &closed)) == NULL) return UNSURE;
    }
    if (p >= end || *p != '}' || p + 1 != end || !trained) return UNSURE;
    return message.role == ROLE_ANSWER ? CHAT : CHAT_OR_PROMPT;
}

/* The number of lines as fast.split_lines counts them: split at every newline, less an empty
 * piece after a final newline (an empty block is one empty line). */
static Py_ssize_t count_lines(cursor data, Py_ssize_t size) {
    Py_ssize_t n = 1;
    cursor p = data, end = data + size;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        n++;
        p++;
    }
    return (size > 0 && data[size - 1] == '\n') ? n - 1 : n;
}

static Py_ssize_t scan_lines(cursor data, Py_ssize_t size, Line *lines, Py_ssize_t n) {
    Py_ssize_t longest = 0, start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (start > size) start = size; /* never, for bytes: count_lines counted these lines */
        cursor newline = memchr(data + start, '\n', (size_t)(size - start));
        Py_ssize_t stop = newline ? newline - data : size;
        Py_ssize_t a = start, b = stop;
        while (a < b && is_strip_space(data[a])) a++;
        while (b > a && is_strip_space(data[b - 1])) b--;
        lines[i] = (Line){start, stop, a, b, XXH3_64bits(data + a, (size_t)(b - a)), UNSURE};
        lines[i].kind = classify_line(data + a, data + b);
        if (stop - start > longest) longest = stop - start;
        start = stop + 1;
    }
    return longest;
}

/* dict[i] = value, taking the reference to value (NULL: an error already set). */
static int set_item(PyObject *dict, Py_ssize_t i, PyObject *value) {
    PyObject *index = PyLong_FromSsize_t(i);
    int failed = index == NULL || value == NULL || PyDict_SetItem(dict, index, value) < 0;
    Py_XDECREF(index);
    Py_XDECREF(value);
    return failed ? -1 : 0;
}

static PyObject *build_result(cursor data, const Line *lines, Py_ssize_t n, Py_ssize_t longest, PyObject *chat,
                              PyObject *chat_or_prompt, uint64_t trained_stride, uint64_t sample_stride) {
    PyObject *kinds = PyList_New(n), *keys = PyList_New(n), *sizes = PyList_New(n);
    PyObject *unsure = PyDict_New(), *chosen = PyDict_New();
    if (!kinds || !keys || !sizes || !unsure || !chosen) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Line *line = &lines[i];
        PyObject *kind = line->kind == CHAT ? chat : line->kind == CHAT_OR_PROMPT ? chat_or_prompt : Py_None;
        Py_INCREF(kind);
        PyList_SET_ITEM(kinds, i, kind);
        PyObject *key = PyLong_FromUnsignedLongLong(line->key);
        PyObject *length = PyLong_FromSsize_t(line->text_stop - line->text_start);
        if (!key || !length) {
            Py_XDECREF(key);
            Py_XDECREF(length);
            goto fail;
        }
        PyList_SET_ITEM(keys, i, key);
        PyList_SET_ITEM(sizes, i, length);
        int sampled = line->key % trained_stride == 0 || (sample_stride && line->key % sample_stride == 0);
        if (line->kind == UNSURE || sampled) {
            PyObject *raw = PyBytes_FromStringAndSize((const char *)data + line->start, line->stop - line->start);
            if (set_item(line->kind == UNSURE ? unsure : chosen, i, raw) < 0) goto fail;
        }
    }
    return Py_BuildValue("(NNNnNN)", kinds, keys, sizes, longest, unsure, chosen);
fail:
    Py_XDECREF(kinds);
    Py_XDECREF(keys);
    Py_XDECREF(sizes);
    Py_XDECREF(unsure);
    Py_XDECREF(chosen);
    return NULL;
}

PyDoc_STRVAR(scan_doc,
             "scan(block, chat, chat_or_prompt, trained_stride, sample_stride)\n"
             "-> (kinds, keys, sizes, longest, unsure, chosen)\n\n"
             "Per line of ``block`` (lines as fast.split_lines has them): its kind (``chat``,\n"
             "``chat_or_prompt``, or None where the scanner is unsure), the xxh3 key and the\n"
             "size of the stripped line; the longest line's length; ``unsure``, {index: line}\n"
             "of the lines it is unsure of; ``chosen``, {index: line} of the other lines\n"
             "whose key a stride (sample_stride 0: none) divides. ``block`` must be bytes\n"
             "(immutable: the scan runs without the GIL).");

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *block, *chat, *chat_or_prompt, *result;
    Py_ssize_t trained_stride, sample_stride;
    (void)self;
    /* bytes only (S): a mutable buffer could change under the scan, which runs without the GIL */
    if (!PyArg_ParseTuple(args, "SOOnn", &block, &chat, &chat_or_prompt, &trained_stride, &sample_stride))
        return NULL;
    if (trained_stride < 1 || sample_stride < 0) {
        PyErr_SetString(PyExc_ValueError, "trained_stride must be at least 1, sample_stride at least 0");
        return NULL;
    }
    cursor data = (cursor)PyBytes_AS_STRING(block);
    Py_ssize_t size = PyBytes_GET_SIZE(block), n = count_lines(data, size), longest;
    Line *lines = PyMem_RawMalloc((size_t)n * sizeof(Line));
    if (lines == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    longest = scan_lines(data, size, lines, n);
    Py_END_ALLOW_THREADS
    result = build_result(data, lines, n, longest, chat, chat_or_prompt, (uint64_t)trained_stride,
                          (uint64_t)sample_stride);
    PyMem_RawFree(lines);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_linescan", "The validator's first pass over chat JSONL lines, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__linescan(void) { return PyModule_Create(&module); }
