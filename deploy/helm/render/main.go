// Command helm-render renders a Helm chart's templates the way
// `helm template` does, for the chart checks in hearth's tests, on machines
// where no helm binary can be installed and no Go module can be fetched.
//
// It uses the engine helm uses (Go's text/template, missingkey=zero, "<no
// value>" blanked), helm's built-in objects (.Values, .Release, .Chart,
// .Capabilities, .Template) and the helm and sprig functions the hearth chart
// calls, written here with the semantics of their upstream definitions.
// A template calling any other function fails to parse, so the chart cannot
// drift onto functions this renderer does not implement.
//
// YAML is read by the caller (deploy/helm/check_chart.py converts
// values.yaml, Chart.yaml and override files to JSON); numbers are decoded
// as float64, as helm's sigs.k8s.io/yaml decoding does. Output is one
// "---\n# Source: <chart>/templates/<file>" block per rendered file, like
// `helm template`.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

// Metadata is the subset of helm's chart.Metadata that templates read as
// .Chart (field names as in helm).
type Metadata struct {
	Name        string            `json:"name"`
	Home        string            `json:"home"`
	Sources     []string          `json:"sources"`
	Version     string            `json:"version"`
	Description string            `json:"description"`
	Keywords    []string          `json:"keywords"`
	Icon        string            `json:"icon"`
	APIVersion  string            `json:"apiVersion"`
	AppVersion  string            `json:"appVersion"`
	KubeVersion string            `json:"kubeVersion"`
	Type        string            `json:"type"`
	Annotations map[string]string `json:"annotations"`
}

// KubeVersion is helm's chartutil.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

// String is what `{{ .Capabilities.KubeVersion }}` prints.
func (k KubeVersion) String() string { return k.Version }

// GitVersion is the deprecated alias helm keeps.
func (k KubeVersion) GitVersion() string { return k.Version }

// VersionSet is helm's chartutil.VersionSet.
type VersionSet []string

// Has tells whether the API version (group/version or group/version/Kind)
// is served.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// Capabilities is helm's chartutil.Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	chartDir := flag.String("chart", "", "chart directory")
	chartJSON := flag.String("chart-json", "", "Chart.yaml converted to JSON")
	valuesJSON := flag.String("values-json", "", "the chart's values.yaml converted to JSON")
	var overrides, apiVersions stringList
	flag.Var(&overrides, "override-json", "a -f values file converted to JSON (repeatable, later wins)")
	flag.Var(&apiVersions, "api-versions", "extra API version the cluster serves (repeatable)")
	name := flag.String("name", "hearth", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.37.0", "Kubernetes version for .Capabilities")
	notesOut := flag.String("notes-out", "", "write the rendered NOTES.txt here")
	flag.Parse()
	if *chartDir == "" || *chartJSON == "" || *valuesJSON == "" {
		fmt.Fprintln(os.Stderr, "usage: helm-render -chart DIR -chart-json FILE -values-json FILE [-override-json FILE]...")
		os.Exit(2)
	}
	out, notes, err := render(*chartDir, *chartJSON, *valuesJSON, overrides, apiVersions, *name, *namespace, *kubeVersion)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm-render: error:", err)
		os.Exit(1)
	}
	if *notesOut != "" {
		if err := os.WriteFile(*notesOut, []byte(notes), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "helm-render: error:", err)
			os.Exit(1)
		}
	}
	os.Stdout.WriteString(out)
}

func readJSON(path string) (any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

func render(chartDir, chartJSON, valuesJSON string, overrides, apiVersions []string,
	name, namespace, kubeVersion string) (string, string, error) {
	var meta Metadata
	data, err := os.ReadFile(chartJSON)
	if err != nil {
		return "", "", err
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		return "", "", fmt.Errorf("%s: %w", chartJSON, err)
	}
	defaults, err := readJSON(valuesJSON)
	if err != nil {
		return "", "", err
	}
	values := map[string]any{}
	if m, ok := defaults.(map[string]any); ok {
		values = m
	}
	// Like helm: each -f file is coalesced over the defaults, later files
	// winning.
	for _, path := range overrides {
		o, err := readJSON(path)
		if err != nil {
			return "", "", err
		}
		user, _ := o.(map[string]any)
		if user == nil {
			user = map[string]any{}
		}
		values = coalesce(user, values)
	}

	major, minor := "1", "37"
	if parts := strings.SplitN(strings.TrimPrefix(kubeVersion, "v"), ".", 3); len(parts) >= 2 {
		major, minor = parts[0], parts[1]
	}
	caps := &Capabilities{
		KubeVersion: KubeVersion{Version: kubeVersion, Major: major, Minor: minor},
		APIVersions: append(VersionSet{"v1", "apps/v1", "rbac.authorization.k8s.io/v1",
			"scheduling.k8s.io/v1", "policy/v1"}, apiVersions...),
	}
	top := map[string]any{
		"Values": values,
		"Release": map[string]any{
			"Name": name, "Namespace": namespace, "IsInstall": true,
			"IsUpgrade": false, "Revision": 1, "Service": "Helm",
		},
		"Chart":        &meta,
		"Capabilities": caps,
		"Files":        map[string]any{},
	}

	templatesDir := filepath.Join(chartDir, "templates")
	var files []string
	err = filepath.WalkDir(templatesDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		return "", "", err
	}
	sort.Strings(files)

	t := template.New("gotpl")
	t.Option("missingkey=zero")
	includeDepth := 0
	funcs := funcMap()
	funcs["include"] = func(name string, data any) (string, error) {
		// helm stops runaway recursion the same way.
		includeDepth++
		defer func() { includeDepth-- }()
		if includeDepth > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	t.Funcs(funcs)
	names := make([]string, 0, len(files))
	for _, path := range files {
		rel, _ := filepath.Rel(chartDir, path)
		tname := meta.Name + "/" + filepath.ToSlash(rel)
		text, err := os.ReadFile(path)
		if err != nil {
			return "", "", err
		}
		if _, err := t.New(tname).Parse(string(text)); err != nil {
			return "", "", fmt.Errorf("parse error in %s: %w", tname, err)
		}
		names = append(names, tname)
	}

	var out, notes strings.Builder
	for _, tname := range names {
		base := filepath.Base(tname)
		if strings.HasPrefix(base, "_") {
			continue
		}
		vals := map[string]any{}
		for k, v := range top {
			vals[k] = v
		}
		vals["Template"] = map[string]any{"Name": tname, "BasePath": meta.Name + "/templates"}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, tname, vals); err != nil {
			return "", "", fmt.Errorf("rendering %s: %w", tname, err)
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			notes.WriteString(text)
			continue
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", tname, strings.TrimLeft(text, "\n"))
	}
	return out.String(), notes.String(), nil
}

// coalesce merges the chart's values under the user's: keys the user did
// not set come from the chart, maps merge key by key, and a user null
// removes the chart's key (helm's chartutil.CoalesceValues).
func coalesce(user, chart map[string]any) map[string]any {
	for k, cv := range chart {
		uv, ok := user[k]
		if !ok {
			user[k] = cv
			continue
		}
		if uv == nil {
			delete(user, k)
			continue
		}
		um, uok := uv.(map[string]any)
		cm, cok := cv.(map[string]any)
		if uok && cok {
			user[k] = coalesce(um, cm)
		}
	}
	return user
}

// strval is sprig's conversion of any value to a string.
func strval(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	case error:
		return x.Error()
	case fmt.Stringer:
		return x.String()
	default:
		return fmt.Sprintf("%v", x)
	}
}

// empty is sprig's notion of an empty value (also what `default` tests).
func empty(v any) bool {
	rv := reflect.ValueOf(v)
	if !rv.IsValid() {
		return true
	}
	switch rv.Kind() {
	case reflect.Array, reflect.Map, reflect.Slice, reflect.String:
		return rv.Len() == 0
	case reflect.Bool:
		return !rv.Bool()
	case reflect.Complex64, reflect.Complex128:
		return rv.Complex() == 0
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return rv.Int() == 0
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return rv.Uint() == 0
	case reflect.Float32, reflect.Float64:
		return rv.Float() == 0
	case reflect.Struct:
		return false
	default:
		return rv.IsNil()
	}
}

func funcMap() template.FuncMap {
	return template.FuncMap{
		// helm's own functions
		"toYaml": toYAML,
		"toJson": func(v any) string {
			data, err := json.Marshal(v)
			if err != nil {
				return ""
			}
			return string(data)
		},
		"required": func(warn string, val any) (any, error) {
			if val == nil {
				return val, errors.New(warn)
			}
			if s, ok := val.(string); ok && s == "" {
				return val, errors.New(warn)
			}
			return val, nil
		},
		"fail": func(msg string) (string, error) { return "", errors.New(msg) },
		// sprig
		"default": func(d any, given ...any) any {
			if len(given) == 0 || empty(given[0]) {
				return d
			}
			return given[0]
		},
		"empty": empty,
		"quote": func(str ...any) string {
			out := make([]string, 0, len(str))
			for _, s := range str {
				if s != nil {
					out = append(out, fmt.Sprintf("%q", strval(s)))
				}
			}
			return strings.Join(out, " ")
		},
		"squote": func(str ...any) string {
			out := make([]string, 0, len(str))
			for _, s := range str {
				if s != nil {
					out = append(out, fmt.Sprintf("'%v'", s))
				}
			}
			return strings.Join(out, " ")
		},
		"indent": indent,
		"nindent": func(spaces int, v string) string {
			return "\n" + indent(spaces, v)
		},
		"trunc": func(c int, s string) string {
			if c < 0 && len(s)+c > 0 {
				return s[len(s)+c:]
			}
			if c >= 0 && len(s) > c {
				return s[:c]
			}
			return s
		},
		"trimSuffix": func(a, b string) string { return strings.TrimSuffix(b, a) },
		"trimPrefix": func(a, b string) string { return strings.TrimPrefix(b, a) },
		"trim":       strings.TrimSpace,
		"replace":    func(old, new, src string) string { return strings.Replace(src, old, new, -1) },
		"lower":      strings.ToLower,
		"contains":   func(substr, str string) bool { return strings.Contains(str, substr) },
		"hasPrefix":  func(prefix, str string) bool { return strings.HasPrefix(str, prefix) },
		"toString":   strval,
		"b64enc":     func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) },
		"sha256sum": func(input string) string {
			hash := sha256.Sum256([]byte(input))
			return hex.EncodeToString(hash[:])
		},
		"kindIs": func(kind string, src any) bool {
			return reflect.ValueOf(src).Kind().String() == kind
		},
		"hasKey": func(d map[string]any, key string) bool {
			_, ok := d[key]
			return ok
		},
		"dict": func(v ...any) map[string]any {
			dict := map[string]any{}
			for i := 0; i < len(v); i += 2 {
				key := strval(v[i])
				if i+1 >= len(v) {
					dict[key] = ""
					continue
				}
				dict[key] = v[i+1]
			}
			return dict
		},
		"list":      func(v ...any) []any { return v },
		"splitList": func(sep, orig string) []string { return strings.Split(orig, sep) },
		"has": func(needle any, haystack any) bool {
			if haystack == nil {
				return false
			}
			l := reflect.ValueOf(haystack)
			if l.Kind() != reflect.Slice && l.Kind() != reflect.Array {
				return false
			}
			for i := 0; i < l.Len(); i++ {
				if reflect.DeepEqual(needle, l.Index(i).Interface()) {
					return true
				}
			}
			return false
		},
		"atoi": func(a string) int {
			i, _ := strconv.Atoi(a)
			return i
		},
		"int": toInt,
		"omit": func(dict map[string]any, keys ...string) map[string]any {
			res := map[string]any{}
			omit := make(map[string]bool, len(keys))
			for _, k := range keys {
				omit[k] = true
			}
			for k, v := range dict {
				if !omit[k] {
					res[k] = v
				}
			}
			return res
		},
		"ternary": func(vt, vf any, v bool) any {
			if v {
				return vt
			}
			return vf
		},
	}
}

// toInt is sprig's `int` (spf13/cast's ToInt): numbers truncate, strings
// parse (decimal, 0x hex, 0 octal), anything else is 0.
func toInt(v any) int {
	switch x := v.(type) {
	case int:
		return x
	case int64:
		return int(x)
	case float64:
		return int(x)
	case bool:
		if x {
			return 1
		}
		return 0
	case string:
		i, err := strconv.ParseInt(strings.TrimSpace(x), 0, 0)
		if err != nil {
			return 0
		}
		return int(i)
	}
	return 0
}

func indent(spaces int, v string) string {
	pad := strings.Repeat(" ", spaces)
	return pad + strings.Replace(v, "\n", "\n"+pad, -1)
}

// toYAML is helm's toYaml: sigs.k8s.io/yaml, which goes through JSON
// (so map keys come out sorted and numbers as JSON writes them), in
// go-yaml's block style, with the final newline trimmed. Scalars are
// written plain when that cannot change their type and double-quoted
// otherwise: the same values as go-yaml's output, not always the same
// bytes.
func toYAML(v any) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var node any
	if err := dec.Decode(&node); err != nil {
		return ""
	}
	var b strings.Builder
	writeNode(&b, node, 0)
	return strings.TrimSuffix(b.String(), "\n")
}

func isCollection(v any) bool {
	switch x := v.(type) {
	case map[string]any:
		return len(x) > 0
	case []any:
		return len(x) > 0
	}
	return false
}

// writeNode writes v as a block starting at column `indent` of a new line.
func writeNode(b *strings.Builder, v any, indent int) {
	pad := strings.Repeat(" ", indent)
	switch x := v.(type) {
	case map[string]any:
		if len(x) == 0 {
			b.WriteString(pad + "{}\n")
			return
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			b.WriteString(pad + scalar(k) + ":")
			child := x[k]
			switch c := child.(type) {
			case map[string]any:
				if len(c) > 0 {
					b.WriteString("\n")
					writeNode(b, c, indent+2)
					continue
				}
			case []any:
				if len(c) > 0 {
					// go-yaml does not indent a sequence under its key.
					b.WriteString("\n")
					writeNode(b, c, indent)
					continue
				}
			}
			b.WriteString(" " + inline(child) + "\n")
		}
	case []any:
		if len(x) == 0 {
			b.WriteString(pad + "[]\n")
			return
		}
		for _, item := range x {
			b.WriteString(pad + "- ")
			if isCollection(item) {
				// The item's first line continues after "- ".
				var sub strings.Builder
				writeNode(&sub, item, indent+2)
				b.WriteString(strings.TrimPrefix(sub.String(), pad+"  "))
				continue
			}
			b.WriteString(inline(item) + "\n")
		}
	default:
		b.WriteString(pad + inline(v) + "\n")
	}
}

// inline writes a scalar or an empty collection.
func inline(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		if x {
			return "true"
		}
		return "false"
	case json.Number:
		return x.String()
	case string:
		return scalar(x)
	case map[string]any:
		return "{}"
	case []any:
		return "[]"
	}
	return scalar(fmt.Sprint(v))
}

var (
	plainSafe = regexp.MustCompile(`^[A-Za-z_/][A-Za-z0-9_./-]*( [A-Za-z0-9_./-]+)*$`)
	// YAML 1.1 words go-yaml reads as booleans or null.
	specialWords = regexp.MustCompile(`^(?i:y|n|yes|no|on|off|true|false|null)$`)
)

// scalar writes a string plain when it can only read back as that string,
// else double-quoted (JSON escapes are valid YAML double-quoted escapes).
func scalar(s string) string {
	if plainSafe.MatchString(s) && !specialWords.MatchString(s) {
		return s
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	return strings.TrimSuffix(buf.String(), "\n")
}
