// render: a stand-in for `helm template`, for checking this chart where the
// helm binary is not available. It uses Go's text/template with the sprig
// function library (Debian: golang-go, golang-github-masterminds-sprig-dev,
// golang-gopkg-yaml.v2-dev) plus Helm's own functions (include, tpl,
// required, toYaml, fromYaml, toJson, fromJson, lookup -> empty), the same
// values coalescing (maps merge, everything else replaces, null deletes) and
// missingkey=zero. Build and run (GOPATH mode, no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go run main.go ../gateway [-f extra.yaml] [--set a.b=yamlvalue] [--notes]
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

func normalize(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, x := range t {
			m[fmt.Sprint(k)] = normalize(x)
		}
		return m
	case map[string]interface{}:
		for k, x := range t {
			t[k] = normalize(x)
		}
		return t
	case []interface{}:
		for i, x := range t {
			t[i] = normalize(x)
		}
		return t
	}
	return v
}

// jsonish turns YAML data into what Helm holds after sigs.k8s.io/yaml: numbers are float64.
func jsonish(v interface{}) (interface{}, error) {
	b, err := json.Marshal(normalize(v))
	if err != nil {
		return nil, err
	}
	var out interface{}
	err = json.Unmarshal(b, &out)
	return out, err
}

func readYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	v, err := jsonish(raw)
	if err != nil {
		return nil, err
	}
	if v == nil {
		return map[string]interface{}{}, nil
	}
	return v.(map[string]interface{}), nil
}

// coalesce merges src over dst like Helm: maps merge, null deletes, the rest replaces.
func coalesce(dst, src map[string]interface{}) {
	for k, sv := range src {
		if sv == nil {
			delete(dst, k)
			continue
		}
		sm, sok := sv.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			coalesce(dm, sm)
		} else {
			dst[k] = sv
		}
	}
}

func toYAML(v interface{}) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var obj interface{}
	if err := yaml.Unmarshal(b, &obj); err != nil {
		return ""
	}
	out, err := yaml.Marshal(obj)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(out), "\n")
}

func fromYAML(s string) map[string]interface{} {
	var raw interface{}
	if err := yaml.Unmarshal([]byte(s), &raw); err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	v, _ := jsonish(raw)
	m, ok := v.(map[string]interface{})
	if !ok {
		return map[string]interface{}{}
	}
	return m
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: render CHART_DIR [-f values.yaml]... [--set a.b=value]... [--notes]")
		os.Exit(2)
	}
	chartDir := os.Args[1]
	chartMeta, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	must(err)
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	must(err)
	notes := false
	args := os.Args[2:]
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "-f":
			i++
			extra, err := readYAML(args[i])
			must(err)
			coalesce(values, extra)
		case "--set":
			i++
			kv := strings.SplitN(args[i], "=", 2)
			var v interface{}
			must(yaml.Unmarshal([]byte(kv[1]), &v)) // ints stay int, like helm --set
			keys := strings.Split(kv[0], ".")
			m := map[string]interface{}{keys[len(keys)-1]: normalize(v)}
			for j := len(keys) - 2; j >= 0; j-- {
				m = map[string]interface{}{keys[j]: m}
			}
			coalesce(values, m)
		case "--notes":
			notes = true
		default:
			must(fmt.Errorf("unknown argument %q", args[i]))
		}
	}

	name := fmt.Sprint(chartMeta["name"])
	base := name + "/templates"
	root := template.New("gotpl").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includeDepth := 0
	funcs["include"] = func(n string, data interface{}) (string, error) {
		includeDepth++
		defer func() { includeDepth-- }()
		if includeDepth > 1000 {
			return "", fmt.Errorf("include %q: too deep", n)
		}
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, n, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(s string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(s)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || fmt.Sprint(v) == "" {
			return v, fmt.Errorf(msg)
		}
		return v, nil
	}
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = fromYAML
	funcs["toJson"] = func(v interface{}) string { b, _ := json.Marshal(v); return string(b) }
	funcs["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		_ = json.Unmarshal([]byte(s), &m)
		return m
	}
	funcs["lookup"] = func(apiVersion, kind, ns, n string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil // like `helm template`: no cluster
	}
	root.Funcs(funcs)

	files, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	must(err)
	sort.Strings(files)
	var names []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		must(err)
		n := base + "/" + filepath.Base(f)
		_, err = root.New(n).Parse(string(data))
		must(err)
		names = append(names, n)
	}

	top := map[string]interface{}{
		"Values": values,
		"Chart": map[string]interface{}{
			"Name": chartMeta["name"], "Version": chartMeta["version"], "AppVersion": chartMeta["appVersion"],
			"Description": chartMeta["description"],
		},
		"Release":      map[string]interface{}{"Name": "demo", "Namespace": "edge", "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1},
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.30.0"}},
	}
	failed := false
	for _, n := range names {
		b := filepath.Base(n)
		if strings.HasPrefix(b, "_") || (b == "NOTES.txt") != notes {
			continue
		}
		if !strings.HasSuffix(b, ".yaml") && !strings.HasSuffix(b, ".yml") && b != "NOTES.txt" {
			continue
		}
		data := map[string]interface{}{}
		for k, v := range top {
			data[k] = v
		}
		data["Template"] = map[string]interface{}{"Name": n, "BasePath": base}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, n, data); err != nil {
			fmt.Fprintf(os.Stderr, "Error: %v\n", err)
			failed = true
			continue
		}
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(out) == "" {
			continue
		}
		if notes {
			fmt.Print(out)
		} else {
			fmt.Printf("---\n# Source: %s\n%s\n", n, strings.TrimSpace(out))
		}
	}
	if failed {
		os.Exit(1)
	}
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}
